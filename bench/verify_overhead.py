"""Signed versions: what verification costs a pull and an activation.

    python -m bench.verify_overhead [--size-gb 2] [--runs 3] [--reps 100] [--connections 4]

Part a, the pull: generates an incompressible artifact (random U8 tensors in
safetensors shards, as `bench.pull_throughput` does), publishes it with the library
into an origin store, signed (`fabric.signing.SigningTarget`: a version statement and a
signed move of channel `prod`), starts `fabric origin` on loopback, and times
`fabric pull bench:prod DEST --origin … --store <empty> --json` (child start → exit →
`sync`), with and without `--trust FILE` (a trust file that trusts the publishing key
for the artifact), `--runs` times each, interleaved (alternating which goes first), each
run printed. Overhead = median with / median without − 1.

The difference of two 2 GB pulls on a shared machine is mostly noise, so part b also
times the verification itself, `--reps` times each, against the same live origin:

* pull: what `fabric pull --trust` does before its first chunk
  (`fabric.signing.check_origin`: GET /v1/trust, the channel with its statement,
  GET the version's signature, verify both, then the version statement against the
  manifest id) next to what a pull without it does (`OriginClient.resolve` of the
  channel); the added time is the difference of the medians;
* activation: the checks a site agent runs for one activation (agents/site/trust.py):
  the channel statement (`Verifier.verify_channel` with the last accepted sequence),
  the version statement against the manifest id (`verify_version`), and both again
  right before the flip, on the envelopes the origin serves, parsed from bytes each
  time, as the agent does.

Part c, real site agents: two `fabric agent` processes on the same origin follow
`small:prod`, one with `trust = FILE`, one without; `--deploys` small signed versions
(2 MB of new random bytes each) are published and moved to `prod` one after the other,
each awaited at both sites; then each agent's own metrics give its mean deploy time
(`fabric_agent_deploy_seconds`, outcome activated: manifest, statements, chunks,
activation) and mean flip time (`fabric_agent_activation_seconds`). The difference of
the deploy means is what verification (with its requests and its fsynced records) adds
to a deploy at a real site.

Data lives in a temp folder under /tmp, removed at the end; every server is stopped
also on failure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

from bench import machine, md_table, scrape
from bench.pull_throughput import FABRIC, _child_env, clear, free_port, generate, service, timed, wait_http

COMMAND = "python -m bench.verify_overhead"
TOKEN = "bench-verify-token-0123456789abcdef"
ARTIFACT, CHANNEL = "bench", "prod"
MB = 1e6


def publish_signed(store: Path, src: Path, key_file: Path) -> dict:
    from fabric.publish import LocalTarget, publish
    from fabric.signing import Signer, SigningTarget
    from fabric.store.store import open_store
    from fabric.trust import load_private_key

    target = SigningTarget(LocalTarget(open_store(store, compress=False)), Signer([load_private_key(key_file)]))
    return publish(src, artifact=ARTIFACT, version="v1", channel=CHANNEL, target=target).to_json()


def pull_runs(work: Path, origin_url: str, trust: Path, runs: int, connections: int, size: int) -> list[dict]:
    """`runs` pulls with and `runs` without --trust, interleaved; every run printed."""
    env = _child_env()
    store, dest = work / "client-store", work / "dest"
    base = [FABRIC, "pull", f"{ARTIFACT}:{CHANNEL}", str(dest), "--origin", origin_url, "--token", TOKEN,
            "--store", str(store), "--connections", str(connections), "--json"]
    out = []
    for i in range(runs):
        order = ("unsigned", "trust") if i % 2 == 0 else ("trust", "unsigned")
        for kind in order:
            clear(store, dest)
            cmd = base + (["--trust", str(trust)] if kind == "trust" else [])
            t_exit, t_sync, stdout = timed(cmd, env)
            report = json.loads(stdout)
            verified = (report.get("trust") or {}).get("state")
            if kind == "trust" and verified != "verified":
                raise SystemExit(f"a pull with --trust did not verify: {report.get('trust')}")
            out.append({"run": i + 1, "kind": kind, "exit_s": t_exit, "synced_s": t_sync, "state": verified})
            _log(f"[pull] run {i + 1} {'--trust' if kind == 'trust' else 'no --trust':<10} "
                 f"{t_sync:7.2f}s to synced ({size / MB / t_sync:,.0f} MB/s), {t_exit:.2f}s to exit")
    clear(store, dest)
    return out


def timings(fn, reps: int) -> tuple[list[float], list[float]]:
    """(wall seconds, this thread's CPU seconds) of each of `reps` calls of `fn`."""
    wall, cpu = [], []
    for _ in range(reps):
        t0, c0 = time.perf_counter(), time.thread_time()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.thread_time() - c0)
    return wall, cpu


def p99(xs: list[float]) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(0.99 * (len(s) - 1))))]


def checks(origin_url: str, trust: Path, reps: int) -> dict[str, list[float]]:
    """The verification steps alone, `reps` times each, against the live origin."""
    from fabric.signing import check_origin
    from fabric.trust import TrustPolicy, Verifier
    from fabric.wire.client import OriginClient

    policy = TrustPolicy.load(trust)

    async def run() -> dict[str, list[float]]:
        async with OriginClient(origin_url, TOKEN) as client:
            manifest = await client.manifest(ARTIFACT, "v1")
            ch = await client.channel(ARTIFACT, CHANNEL)
            envelope = await client.get_signature(ARTIFACT, "v1")
            statement = ch.statement_bytes
            out: dict[str, list[float]] = {k: [] for k in ("resolve", "resolve_cpu", "check", "check_cpu")}
            for _ in range(reps):  # interleaved, so drift hits both alike
                t0, c0 = time.perf_counter(), time.thread_time()
                await client.resolve(ARTIFACT, None, CHANNEL)
                out["resolve"].append(time.perf_counter() - t0)
                out["resolve_cpu"].append(time.thread_time() - c0)
                t0, c0 = time.perf_counter(), time.thread_time()
                _, _, on_manifest = await check_origin(client, policy, ARTIFACT, None, CHANNEL)
                on_manifest(manifest)
                out["check"].append(time.perf_counter() - t0)
                out["check_cpu"].append(time.thread_time() - c0)
        verifier = Verifier(policy)
        sequence = ch.sequence

        def activation() -> None:  # the agent: before fetching, then again right before the flip
            for _ in range(2):
                verifier.verify_channel(statement, ARTIFACT, CHANNEL, last_sequence=sequence - 1)
                verifier.verify_version(envelope, ARTIFACT, "v1", manifest.id)
        activation()
        out["activation"], out["activation_cpu"] = timings(activation, reps)
        return out
    return asyncio.run(run())


SITES = {"site-trust": "site-trust-token-5c1a9e0d7b3f2468", "site-plain": "site-plain-token-0f6b2d8e4a1c9753"}
PUBLISH = "bench-verify-publish-0123456789abcdef"


def agent_config(work: Path, site: str, origin_url: str, port: int, trust: Path | None) -> Path:
    lines = [f'site = "{site}"', f'data = "{work / site}"', f'listen = "127.0.0.1:{port}"',
             f'origin = "{origin_url}"', f'token = "{SITES[site]}"', 'follow = ["small:prod"]',
             'report_interval = 5', 'log_level = "warning"']
    if trust is not None:
        lines.append(f'trust = "{trust}"')
    lines += ["[sync]", "resync_interval = 2"]
    path = work / f"{site}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def site_deploys(work: Path, origin_url: str, trust: Path, key_file: Path, deploys: int) -> dict[str, dict]:
    """Part c: mean deploy and flip times at a site with and without a trust policy."""
    from fabric.publish import publish
    from fabric.signing import Signer, SigningTarget
    from fabric.trust import load_private_key
    from fabric.wire.client import RemoteTarget, SyncOrigin

    ports = {site: free_port() for site in SITES}
    urls = {site: f"http://127.0.0.1:{port}" for site, port in ports.items()}
    configs = {site: agent_config(work, site, origin_url, ports[site], trust if site == "site-trust" else None)
               for site in SITES}
    signer = Signer([load_private_key(key_file)])
    with service([FABRIC, "agent", "--config", str(configs["site-trust"])], work / "site-trust.log"), \
            service([FABRIC, "agent", "--config", str(configs["site-plain"])], work / "site-plain.log"), \
            SyncOrigin(origin_url, PUBLISH) as so:
        for site, url in urls.items():
            wait_http(f"{url}/livez", log=work / f"{site}.log")
        for i in range(1, deploys + 1):
            src = work / "small" / f"v{i}"
            src.mkdir(parents=True)
            (src / "weights.bin").write_bytes(os.urandom(2_000_000))
            publish(src, artifact="small", version=f"v{i}", channel="prod", target=SigningTarget(RemoteTarget(so), signer))
            deadline = time.monotonic() + 60
            while True:
                done = [(work / site / "current" / "small").resolve().name == f"v{i}" for site in SITES]
                if all(done):
                    break
                if time.monotonic() > deadline:
                    tail = (work / "site-trust.log").read_text(errors="replace")[-2000:]
                    raise SystemExit(f"v{i} did not reach both sites within 60s: {dict(zip(SITES, done))}\n{tail}")
                time.sleep(0.02)
            _log(f"[site] v{i} active at both sites")
        out = {}
        for site, url in urls.items():
            deadline = time.monotonic() + 10  # a deploy is counted just after its flip
            while (m := scrape(url, SITES[site])).get('fabric_agent_deploy_seconds_count{outcome="activated"}', 0) \
                    < deploys and time.monotonic() < deadline:
                time.sleep(0.1)
            count = m.get('fabric_agent_deploy_seconds_count{outcome="activated"}', 0.0)
            out[site] = {"deploys": int(count),
                         "deploy_s": m.get('fabric_agent_deploy_seconds_sum{outcome="activated"}', 0.0) / max(count, 1),
                         "flip_s": m.get("fabric_agent_activation_seconds_sum", 0.0)
                         / max(m.get("fabric_agent_activation_seconds_count", 0.0), 1),
                         "refused": sum(v for k, v in m.items() if k.startswith("fabric_agent_signature_refusals_total"))}
            _log(f"[site] {site}: {out[site]}")
        return out


def main(argv: Sequence[str] | None = None) -> str:
    p = argparse.ArgumentParser(prog=COMMAND, description=__doc__.split("\n\n")[0])
    p.add_argument("--size-gb", type=float, default=2.0, help="artifact size (default 2)")
    p.add_argument("--runs", type=int, default=3, help="pulls with and without --trust (default 3 each)")
    p.add_argument("--reps", type=int, default=100, help="repetitions of each verification step (default 100)")
    p.add_argument("--connections", type=int, default=4, help="fabric pull --connections (default 4)")
    p.add_argument("--deploys", type=int, default=10, help="versions deployed at the two sites (default 10)")
    args = p.parse_args(argv)
    if not FABRIC or shutil.which("curl") is None:
        raise SystemExit("missing: fabric (pip install -e .) or curl")
    from fabric.trust import TrustPolicy, generate_key, load_public_key

    t_start = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="fabric-verify-bench-", dir="/tmp"))
    try:
        size = int(args.size_gb * 1e9)
        _log(f"generating {size / MB:,.0f} MB of random bytes (safetensors) …")
        generate(work / "src", size, "safetensors")
        key_file, pub_file = generate_key("publisher", work / "keys")
        trust = work / "trust.toml"
        policy = TrustPolicy()
        policy.add(load_public_key(pub_file), [ARTIFACT, "small"], name="publisher")
        policy.save(trust)
        tokens = work / "tokens.toml"
        tokens.write_text(f'[[token]]\nname = "bench"\nsecret = "{TOKEN}"\nscopes = ["pull"]\n'
                          f'[[token]]\nname = "publisher"\nsecret = "{PUBLISH}"\nscopes = ["publish", "pull"]\n'
                          + "".join(f'[[token]]\nname = "{site}"\nsecret = "{secret}"\nscopes = ["pull"]\n'
                                    f'site = "{site}"\n' for site, secret in SITES.items()))
        _log("publishing into the origin store, signed (library, LocalTarget, compression off) …")
        pub = publish_signed(work / "origin-store", work / "src", key_file)
        _log(f"published {ARTIFACT}@v1 → {CHANNEL}: {pub['chunks']} chunks in {pub['seconds']:.1f}s, signed")
        port = free_port()
        origin_url = f"http://127.0.0.1:{port}"
        with service([FABRIC, "origin", "--store", str(work / "origin-store"), "--listen", f"127.0.0.1:{port}",
                      "--tokens", str(tokens), "--log-level", "warning"], work / "origin.log"):
            wait_http(f"{origin_url}/livez", log=work / "origin.log")
            runs = pull_runs(work, origin_url, trust, args.runs, args.connections, size)
            steps = checks(origin_url, trust, args.reps)
            sites = site_deploys(work, origin_url, trust, key_file, args.deploys) if args.deploys else {}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return report(runs, steps, sites, size, args, time.monotonic() - t_start)


def report(runs: list[dict], steps: dict[str, list[float]], sites: dict[str, dict], size: int, args,
           seconds: float) -> str:
    rows = [[r["run"], "with --trust" if r["kind"] == "trust" else "without", f"{r['synced_s']:.2f}",
             f"{r['exit_s']:.2f}", f"{size / MB / r['synced_s']:,.0f}"] for r in runs]
    med = {k: statistics.median(r["synced_s"] for r in runs if r["kind"] == k) for k in ("unsigned", "trust")}
    overhead = med["trust"] / med["unsigned"] - 1
    pull_table = md_table(["run", "pull", "seconds (to synced)", "seconds (to exit)", "MB/s"], rows)
    ms = {k: [x * 1e3 for x in v] for k, v in steps.items()}
    added = statistics.median(ms["check"]) - statistics.median(ms["resolve"])
    def row(label: str, key: str) -> list:
        wall, cpu = ms[key], ms[f"{key}_cpu"]
        return [label, args.reps, f"{statistics.median(wall):.3f}", f"{p99(wall):.3f}",
                f"{statistics.median(cpu):.3f}", f"{p99(cpu):.3f}"]
    step_rows = [row("pull without --trust: resolve the channel (1 request)", "resolve"),
                 row("pull with --trust: delegations, channel + statement, signature; verify both (3 requests)",
                     "check"),
                 row("activation at a site: channel + version statement, verified twice (no I/O)", "activation")]
    step_table = md_table(["verification step", "reps", "median ms", "p99 ms", "CPU median ms", "CPU p99 ms"],
                          step_rows)
    m = machine()
    share = added / 1e3 / med["unsigned"]
    notes = [
        f"Pull of {size / MB:,.0f} MB: median {med['trust']:.2f}s with --trust, {med['unsigned']:.2f}s without: "
        f"{overhead:+.2%} ({args.runs} runs each, interleaved; runs of one kind spread "
        f"{_spread(runs, 'unsigned'):.0%} and {_spread(runs, 'trust'):.0%}): a difference of end-to-end times "
        "says little where runs of one kind spread more than the goal.",
        f"What --trust adds before the first chunk, measured alone: {added:.2f} ms (median of {args.reps}), "
        f"{share:.4%} of the median pull without it. Goal < 1%: {'met' if share < 0.01 else 'not met'}.",
        f"Activation: the agent's verification of one activation takes {statistics.median(ms['activation']):.3f} ms "
        f"median, {p99(ms['activation']):.3f} ms p99 wall time ({statistics.median(ms['activation_cpu']):.3f} ms "
        f"median, {p99(ms['activation_cpu']):.3f} ms p99 of CPU). Goal < 5 ms: "
        f"{'met' if statistics.median(ms['activation']) < 5 else 'not met'} by the median wall time, "
        f"{'met' if p99(ms['activation_cpu']) < 5 else 'not met'} by the p99 CPU time. Wall time includes waiting "
        "for a CPU when the machine is oversubscribed (see the load average). (The agent also writes its trust "
        "state and the version's envelope, one small fsynced file each, not timed here.)",
        f"Artifact: random U8 tensors in 256 MiB safetensors shards (8 MiB chunks), {len(runs) // 2} pulls each "
        f"into an empty store; origin and client on loopback, sharing {m['nproc']} CPUs ({m['cpu']}) with "
        f"other work. Took {seconds:.0f}s.",
    ]
    if sites:
        t, u = sites["site-trust"], sites["site-plain"]
        site_table = md_table(["site", "trust policy", "deploys", "mean deploy ms", "mean flip ms", "refusals"],
                              [[name, "yes" if name == "site-trust" else "no", x["deploys"],
                                f"{x['deploy_s'] * 1e3:.1f}", f"{x['flip_s'] * 1e3:.2f}", f"{x['refused']:.0f}"]
                               for name, x in sites.items()])
        notes.insert(3, f"At real sites, {t['deploys']} and {u['deploys']} deploys of 2 MB versions: mean deploy "
                        f"{t['deploy_s'] * 1e3:.1f} ms with a trust policy, {u['deploy_s'] * 1e3:.1f} ms without "
                        f"({(t['deploy_s'] - u['deploy_s']) * 1e3:+.1f} ms: verification, the envelope's request and "
                        "the fsynced trust records, plus noise); the flip itself is timed apart.")
        step_table += "\n\n" + site_table
    text = pull_table + "\n\n" + step_table + "\n\n" + "\n".join(f"- {n}" for n in notes)
    print(text)
    return text


def _spread(runs: list[dict], kind: str) -> float:
    """(slowest − fastest) / fastest of one kind's runs."""
    xs = [r["synced_s"] for r in runs if r["kind"] == kind]
    return max(xs) / min(xs) - 1


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
