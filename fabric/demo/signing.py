"""The demo's signed versions: the publisher's key and the sites' trust policy, and the
forgery step that shows every site refusing a version signed by a key it does not trust.

`setup_keys` runs the CLI as an operator would: `fabric key generate publisher` (the
key every demo publish signs with, `--sign-key`), `fabric key generate forger` (an
attacker's key: valid Ed25519, trusted by nobody) and `fabric trust add trust.toml`
(the publisher's key, for the served artifact only); every site runs with
`trust = "../trust.toml"`. `step_forgery` publishes v3 with the forger's key, as an
attacker holding the origin's publish token would: the origin stores it and moves the
channel (it holds no keys and checks none), and every site refuses the channel's
statement (`unknown_key`), keeps v2 active, and its workers keep serving v2.
"""

from __future__ import annotations

import json
import time

from rich.table import Table

from fabric.demo.processes import http_request, wait
from fabric.demo.report import active, finish_publish, publish_args, serving
from fabric.demo.state import CHANNEL, SERVED, SWAP_TIMEOUT, Demo, shown

PUBLISHER, FORGER = "publisher", "forger"
TRUST_FILE = "trust.toml"
FORGED = "v3"


def setup_keys(d: Demo) -> None:
    """The publisher's and the forger's key pairs (keys/), and the sites' trust file."""
    keys = d.root / "keys"
    for name in (PUBLISHER, FORGER):
        d.procs.run(f"key-{name}", ["key", "generate", name, "--out", keys])
    d.procs.run("trust-add", ["trust", "add", d.root / TRUST_FILE, "--key", keys / f"{PUBLISHER}.pub",
                              "--artifacts", SERVED, "--name", PUBLISHER])
    d.console.print(f"keys in {shown(d, keys)}: {PUBLISHER}.key signs every publish (--sign-key); "
                    f"{FORGER}.key is an attacker's, trusted by no site. Every site verifies with "
                    f"{shown(d, d.root / TRUST_FILE)}: {PUBLISHER}'s key, for {SERVED} only")


def site_channel(d: Demo, site) -> dict:
    """The site's `/v1/site` entry for the served channel ({} when it cannot say)."""
    try:
        status, body = http_request(site.url, "GET", "/v1/site", token=d.secrets["admin"])
    except OSError:
        return {}
    if status != 200:
        return {}
    return next((c for c in json.loads(body)["channels"]
                 if c.get("artifact") == SERVED and c.get("channel") == CHANNEL), {})


def trust_of(d: Demo, site) -> tuple[str, str | None]:
    c = site_channel(d, site)
    return c.get("trust") or "-", (c.get("trust_error") or {}).get("code")


def show_verified(d: Demo, version: str) -> None:
    """Say whether every site verified `version`'s signatures (the problems list if not)."""
    states = {s.name: trust_of(d, s)[0] for s in d.sites.values()}
    if all(v == "verified" for v in states.values()):
        d.console.print(f"every site verified {version}'s signatures ({PUBLISHER}'s key) before fetching it")
    else:
        d.problems.append(f"not every site verified {version}: {states}")


def step_forgery(d: Demo) -> None:
    """Publish v3 signed by the forger's key; every site refuses it and keeps serving v2."""
    weights = d.root / "weights"
    d.procs.run("make-weights-v3", ["worker", "demo", "--make-weights", weights / FORGED, "--seed", "3",
                                    "--base", weights / "v2", "--change", "0.25"])
    t0 = time.monotonic()
    p = d.procs.start(f"publish-{FORGED}", publish_args(d, FORGED, key=FORGER), token="admin", capture=True)
    finish_publish(d, FORGED, p)
    d.console.print(f"  the origin took {FORGED} and moved {CHANNEL} to it: it holds no keys and checks no signature")

    def refused() -> bool:
        return all(trust_of(d, s)[0] == "refused" for s in d.sites.values())
    wait(d, f"every site's verdict on {FORGED}", refused, SWAP_TIMEOUT, fail=False)
    seconds = time.monotonic() - t0
    time.sleep(1.0)  # a few more resyncs: nothing changes
    t = Table("site", "active", "trust", "code", "why", title=f"the forged {FORGED} at every site")
    for s in d.sites.values():
        c = site_channel(d, s)
        err = c.get("trust_error") or {}
        code, here = err.get("code"), active(d, s)
        t.add_row(s.name, here or "-", c.get("trust") or "-", code or "-", err.get("message") or "-")
        if c.get("trust") != "refused" or not code:
            d.problems.append(f"{s.name} did not refuse the forged {FORGED} (trust: {c.get('trust')})")
        elif here != "v2":
            d.problems.append(f"{s.name} refused {FORGED} but is not active on v2 (active: {here})")
        else:
            d.refused[s.name] = code
    d.console.print(t)
    for w in d.workers.values():
        if serving(w) != "v2":
            d.problems.append(f"{w.name} serves {serving(w)} after the forgery, not v2")
    kept = [s.name for s in d.sites.values() if (d.root / "sites" / s.name / "versions" / SERVED / FORGED).exists()]
    if kept:
        d.problems.append(f"{', '.join(kept)} wrote {FORGED} into versions/")
    if len(d.refused) == len(d.sites):
        codes = ", ".join(sorted(set(d.refused.values())))
        d.console.print(f"[green]every site refused the forged {FORGED} ({codes}) within {seconds:.1f}s and "
                        f"kept serving v2[/green]; no site has {FORGED} under versions/ (the statement is "
                        "checked before any chunk)", highlight=False)
