"""What the demo shows: publishing the served model, each site's and worker's version,
the replication table (what each site fetched and from where, the origin's egress) and
the workers' swaps, plus small formatting helpers."""

from __future__ import annotations

import filecmp
import http.client
import json
import re
import subprocess
from pathlib import Path

from rich.table import Table

from fabric.core.topology import ORIGIN
from fabric.demo.processes import http_request, metrics
from fabric.errors import DemoFailed
from fabric.demo.state import CHANNEL, SERVED, Demo, Node
from fabric.store.registry import Registry
from fabric.store.store import open_store


def publish_args(d: Demo, version: str, key: str = "publisher") -> list:
    """`fabric publish` of weights/VERSION to the channel, signed with keys/KEY.key."""
    return ["publish", d.root / "weights" / version, "--artifact", SERVED, "--version", version,
            "--channel", CHANNEL, "--origin", d.origin.url, "--sign-key", d.root / "keys" / f"{key}.key", "--json"]


def publish_served(d: Demo, version: str) -> None:
    p = d.procs.start(f"publish-{version}", publish_args(d, version), token="admin", capture=True)
    finish_publish(d, version, p)


def finish_publish(d: Demo, version: str, p: subprocess.Popen) -> None:
    try:
        stdout, stderr = p.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        p.kill()
        raise DemoFailed(f"`fabric publish` of {version} did not finish within 120s") from None
    (d.root / "logs" / f"publish-{version}.log").write_text(stdout + stderr)
    if p.returncode != 0:
        raise DemoFailed(f"`fabric publish` of {version} failed:\n{stderr.strip()}")
    r = d.published[version] = json.loads(stdout)
    signed = f", signed by {r['signed_by'][0][:16]}…" if r.get("signed_by") else ""
    d.console.print(f"  published {SERVED}@{version} → {CHANNEL}{signed}: {r['files']} files, {mb(r['bytes'])}; "
                    f"new {r['new_chunks']} of {r['chunks']} chunks, {mb(r['bytes_sent'])} sent to the origin")


def active(d: Demo, site: Node) -> str | None:
    """The site's active version of the served artifact (its `current/` link)."""
    link = d.root / "sites" / site.name / "current" / SERVED
    return link.resolve().name if link.is_symlink() else None


def serving(worker: Node) -> str | None:
    try:
        status, body = http_request(worker.url, "GET", "/status", timeout=2)
    except (OSError, http.client.HTTPException):
        return None
    return json.loads(body).get("version") if status == 200 else None


def fetch_counters(d: Demo) -> dict[str, float]:
    """Chunk payload bytes so far: the origin's and each site's sent ("origin", "SITE|sent"), and each
    site's fetched for its deploys, by source ("SITE|SOURCE-URL")."""
    out = {"origin": metrics(d.origin.url, d.secrets["admin"]).get("fabric_bytes_sent_total", 0.0)}
    for s in d.sites.values():
        for key, value in metrics(s.url, d.secrets["admin"]).items():
            m = re.fullmatch(r'fabric_agent_bytes_by_source_total\{source="(.*)"\}', key)
            if m:
                out[f"{s.name}|{m.group(1)}"] = value
            elif key == "fabric_bytes_sent_total":
                out[f"{s.name}|sent"] = value
    return out


def show_replication(d: Demo, before: dict[str, float], after: dict[str, float]) -> None:
    names = {d.origin.url: ORIGIN} | {s.url: s.name for s in d.sites.values()}
    ids, new = new_chunks(d, "v1", "v2")
    t = Table("site", "upstream", "active", "fetched", "from", "served", title="v2 through the topology")
    notes = []
    for s in d.sites.values():
        _, body = http_request(s.url, "GET", "/v1/site", token=d.secrets["admin"])
        active_here = ", ".join(c.get("active") or "-" for c in json.loads(body)["channels"])
        delta = {k.split("|", 1)[1]: after[k] - before.get(k, 0.0) for k in after if k.startswith(s.name + "|")}
        served = delta.pop("sent", 0.0)
        by_source = {names.get(src, src): n for src, n in delta.items() if n > 0}
        fetched = sum(by_source.values())
        t.add_row(s.name, s.upstream, active_here, mb(fetched),
                  "\n".join(f"{src} {mb(n)}" for src, n in sorted(by_source.items())) or "-", mb(served))
        if fetched < new and served > 0:
            notes.append(f"{s.name}'s own deploy found v2's chunks already in its store: it had fetched them "
                         f"from {s.upstream} while serving them to the sites below (a relay's pull-through)")
    d.console.print(t)
    d.console.print("  fetched: chunk bytes a site's deploy of v2 fetched, by source; served: chunk bytes it "
                    "sent to other sites", style="dim")
    for note in notes:
        d.console.print(f"  {note}", style="dim")
    sent = after["origin"] - before["origin"]
    once = "each left the origin once" if sent <= new else "some left the origin more than once"
    d.console.print(f"origin egress for v2: {mb(sent)} = {sent / new if new else 0:.2f}× its {len(ids)} new "
                    f"chunks ({mb(new)}): {once}, whatever the number of sites ({len(d.sites)})")


def new_chunks(d: Demo, old: str, new: str) -> tuple[list[str], int]:
    """The chunks of `new` that `old` lacks, and their payload bytes as the origin stores (and sends) them."""
    store = open_store(d.root / "origin" / "store", create=False)
    reg = Registry(store)
    ids = sorted(set(reg.manifest(SERVED, new).unique_chunks()) - set(reg.manifest(SERVED, old).unique_chunks()))
    sizes = store.stored_sizes(ids) or []
    return ids, sum(n - 1 for n in sizes if n)  # less each chunk's one-byte encoding tag


def last_load(worker: Node, version: str) -> dict | None:
    """The worker's report of its last successful load of `version`."""
    try:
        _, body = http_request(worker.url, "GET", "/status")
        loads = json.loads(body).get("loads", [])
    except (OSError, http.client.HTTPException, ValueError):
        return None
    return next((r for r in reversed(loads) if r.get("version") == version and r.get("ok")), None)


def show_workers(d: Demo) -> None:
    versions = sorted(d.stream.versions())
    t = Table("worker", "serving", "requests", "failed", *(f"{v} answers" for v in versions),
              title="requests during the swap")
    for w in d.workers.values():
        answers = d.stream.answers[w.name]
        failed = len(d.stream.failures[w.name])
        t.add_row(w.name, serving(w) or "-", str(sum(answers.values()) + failed), str(failed),
                  *(str(answers[v]) for v in versions))
    d.console.print(t)
    s = d.stream
    versions = ", ".join(f"{v} ({n})" for v, n in sorted(s.versions().items()))
    colour = "green" if not s.failed else "red"
    d.console.print(f"[{colour}]requests: {s.total} total, {s.failed} failed[/{colour}]; "
                    f"versions that answered: {versions}")
    if d.expected:
        d.console.print("  (a request fails on no answer, a status other than 200, or an output other than "
                        "its version's weights give)", style="dim")
    for w, whys in s.failures.items():
        for why in whys[:3]:
            d.console.print(f"  [red]{w}: {why}[/red]", highlight=False)
    if s.failed:
        d.problems.append(f"{s.failed} of {s.total} requests failed")



# --- helpers ------------------------------------------------------------------------------

def identical(a: Path, b: Path) -> bool:
    names_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    names_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    return names_a == names_b and all(filecmp.cmp(a / n, b / n, shallow=False) for n in names_a)


def mb(n: float) -> str:
    if n >= 1e6:
        return f"{n / 1e6:.1f} MB"
    return f"{n / 1e3:.1f} kB" if n >= 1e3 else f"{n:.0f} B"


