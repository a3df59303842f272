"""topology/lab.py: the demo topology built as shaped network namespaces.

The plan tests (addresses, routes, the rewritten topology file, agent configs) run
anywhere. The rest build real namespaces and need root with `ip`/`tc`; they skip, with
the reason, where `lab_available()` says namespaces cannot be made. All traffic stays
inside the lab's namespaces (10.77.0.0/16 exists only there).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `topology` is a folder of the repo, not an installed package
    sys.path.insert(0, str(ROOT))

from fabric.core.topology import ORIGIN, Topology  # noqa: E402
from topology import lab as lab_mod  # noqa: E402
from topology.lab import (HOST_DISK_RETENTION, Lab, LabError, cleanup_stale, fabric_command, lab_available, list_namespaces,  # noqa: E402
                          make_plan)

DEMO, LARGE = ROOT / "topology" / "demo.toml", ROOT / "topology" / "large.toml"
SHAPED = ("origin", "hub-eu")  # the link the throughput test measures
SHAPED_RATE = 50e6
BLOB = 6_000_000
HTTP_PORT = 8000

AVAILABLE, WHY = lab_available()
if AVAILABLE and shutil.which("curl") is None:
    AVAILABLE, WHY = False, "the lab tests fetch with curl (apt-get install -y curl)"
needs_lab = pytest.mark.skipif(not AVAILABLE, reason=f"no namespace lab here: {WHY}")


def ours(tag: str) -> list[str]:
    return [ns for ns in list_namespaces() if ns.startswith(tag + "-")]


def fetch(lab: Lab, node: str, url: str) -> dict:
    """curl `url` from inside `node`: bytes, seconds of transfer, and the body when small."""
    r = lab.run(node, ["curl", "-sS", "-f", "-m", "20", "-o", "/dev/null", "-w",
                       "%{size_download} %{time_pretransfer} %{time_total}", url], timeout=30)
    assert r.returncode == 0, f"{node} -> {url}: {r.stderr}"
    size, pre, total = r.stdout.split()
    return {"bytes": int(float(size)), "seconds": float(total) - float(pre)}


# --- the plan: no root needed --------------------------------------------------------------

def test_plan_gives_unique_names_addresses_and_short_devices():
    plan = make_plan(Topology.load(LARGE), "fab-1-2")
    assert [n.ns for n in plan.nodes.values()] == [f"fab-1-2-{n}" for n in plan.nodes]
    addrs = [n.addr for n in plan.nodes.values()] + [a for l in plan.links for a in (l.addr_a, l.addr_b)]
    assert len(set(addrs)) == len(addrs) and all(a.startswith("10.77.") for a in addrs)
    for l in plan.links:
        assert len(l.dev_a) <= 15 and len(l.dev_b) <= 15
        assert l.subnet.endswith("/30") and l.tree
    assert set(plan.forwarders) == {ORIGIN, "hub-us", "hub-eu"}


def test_plan_routes_follow_the_tree():
    t = Topology.load(DEMO)
    plan = make_plan(t, "fab-1-2")
    routes = {(r.node, r.dest): r for r in plan.routes}
    for s in t.sites.values():  # every site: default route to its upstream, over that link
        r = routes[(s.name, "default")]
        link = next(l for l in plan.links if {l.a, l.b} == {s.name, s.upstream})
        assert (r.via, r.dev, r.src) == (link.end(s.upstream)[1], link.end(s.name)[0], plan.nodes[s.name].addr)
    assert (ORIGIN, "default") not in routes
    for s in t.sites.values():  # the origin reaches every node address through the hub
        assert routes[(ORIGIN, f"{plan.nodes[s.name].addr}/32")].via == plan.links[0].addr_b


def test_plan_cross_link_joins_its_ends_directly():
    t = Topology.from_dict({
        "site": [{"name": n, "region": "r", "upstream": up} for n, up in
                 (("hub", "origin"), ("a", "hub"), ("b", "hub"))],
        "link": [{"a": a, "b": b, "bandwidth": "1gbit"} for a, b in
                 (("origin", "hub"), ("hub", "a"), ("hub", "b"), ("a", "b"))]})
    plan = make_plan(t, "fab-1-2")
    cross = plan.links[3]
    assert not cross.tree and set(plan.forwarders) == {ORIGIN, "hub", "a", "b"}
    routes = {(r.node, r.dest): r for r in plan.routes}
    assert routes[("a", f"{plan.nodes['b'].addr}/32")].via == cross.addr_b
    assert routes[("b", f"{plan.nodes['a'].addr}/32")].via == cross.addr_a
    assert routes[("a", "default")].dev == plan.links[1].dev_b  # everything else goes up the tree


def test_plan_rates_overrides_and_scale():
    t = Topology.load(DEMO)
    plan = make_plan(t, "fab-1-2", rates={("hub-eu", "origin"): "50mbit"}, scale=0.5)
    rates = {(l.a, l.b): l.rate_bps for l in plan.links}
    assert rates[("origin", "hub-eu")] == 50e6 and rates[("hub-eu", "fra-edge-1")] == 0.5e9
    assert plan.links[0].latency_s == pytest.approx(0.040)  # recorded, not emulated
    with pytest.raises(LabError, match="names no link"):
        make_plan(t, "fab-1-2", rates={("fra-edge-1", "ams-edge-1"): "1mbit"})


def test_plan_rejects_a_site_without_a_link_to_its_upstream():
    t = Topology.from_dict({"site": [{"name": "a", "region": "r", "upstream": "origin"}]})
    with pytest.raises(LabError, match="'a' has no \\[\\[link\\]\\] to its upstream 'origin'"):
        make_plan(t, "fab-1-2")


def test_lab_topology_file_and_agent_config_use_namespace_addresses(tmp_path):
    lab = Lab(DEMO, workdir=tmp_path, rates={SHAPED: "50mbit"})  # planned, not built
    lab._write_topology()
    t = Topology.load(lab.topology_path)
    assert t.origin_url == f"http://{lab.addr(ORIGIN)}:7000"
    assert t.sources_for("fra-edge-1")[0].url == f"http://{lab.addr('hub-eu')}:7070"
    assert t.link(*SHAPED).bandwidth == 50e6 and t.link("hub-eu", "par-edge-1").bandwidth == 1e9
    assert t.link(*SHAPED).latency == pytest.approx(0.040)

    path = lab.write_agent_config("fra-edge-1", tmp_path / "data", "s3cret", ["model:prod"],
                                  tmp_path / "tokens.toml", port=7071, keep=3, extra={"sync": {"connections": 4}})
    cfg = tomllib.loads(path.read_text())
    assert cfg["site"] == "fra-edge-1" and cfg["token"] == "s3cret" and cfg["follow"] == ["model:prod"]
    assert cfg["listen"] == f"{lab.addr('fra-edge-1')}:7071" and cfg["origin"] == lab.url(ORIGIN)
    assert cfg["topology"] == str(lab.topology_path.resolve()) and cfg["retention"] == {"keep": 3, **HOST_DISK_RETENTION}
    assert cfg["sync"] == {"connections": 4} and cfg["data"] == str((tmp_path / "data").resolve())
    # the other port is in the topology file too, so peers find this agent
    assert Topology.load(lab.topology_path).site("fra-edge-1").url == lab.url("fra-edge-1") == \
        f"http://{lab.addr('fra-edge-1')}:7071"
    cfg = tomllib.loads(lab.write_agent_config("hub-eu", tmp_path, Path("/t/hub.secret"), [], None).read_text())
    assert cfg["token_file"] == "/t/hub.secret" and "token" not in cfg and "tokens" not in cfg


# --- the built lab --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def demo_lab(tmp_path_factory):
    cleanup_stale()
    blobs = tmp_path_factory.mktemp("blobs")
    (blobs / "blob").write_bytes(bytes(range(256)) * (BLOB // 256) + b"x" * (BLOB % 256))
    (blobs / "hello.txt").write_text("hello from the origin\n")
    with Lab(DEMO, rates={SHAPED: SHAPED_RATE}) as lab:
        lab.blobs = blobs
        yield lab


@pytest.fixture(scope="module")
def origin_http(demo_lab):
    return http_server(demo_lab, ORIGIN, demo_lab.blobs)


def http_server(lab: Lab, node: str, directory: Path) -> subprocess.Popen:
    proc = lab.exec(node, [sys.executable, "-m", "http.server", "--bind", lab.addr(node),
                           "--directory", directory, HTTP_PORT])
    lab.wait_http(node, lab.url(node, HTTP_PORT) + "/", proc=proc, timeout=15)
    return proc


@needs_lab
def test_every_link_is_shaped_at_its_rate_on_both_ends(demo_lab):
    t = Topology.load(DEMO)
    for link in demo_lab.links:
        want = SHAPED_RATE if {link.a, link.b} == set(SHAPED) else t.link(link.a, link.b).bandwidth
        assert link.rate_bps == want
        for node in (link.a, link.b):
            q = demo_lab.qdisc(node, link.other(node))
            assert q["kind"] == "tbf", q
            assert q["options"]["rate"] * 8 == pytest.approx(want, rel=0.01), (node, link.other(node), q)


@needs_lab
def test_nodes_reach_each_other_along_the_tree(demo_lab, origin_http):
    for site in demo_lab.topology.sites:  # up the tree to the origin
        r = demo_lab.run(site, ["curl", "-sSf", "-m", "5", demo_lab.url(ORIGIN, HTTP_PORT) + "/hello.txt"])
        assert r.returncode == 0 and r.stdout == "hello from the origin\n", (site, r.stderr)
    # connections come from node addresses (routes carry `src`)
    assert f"{demo_lab.addr('par-edge-1')} - - " in demo_lab.logs(ORIGIN)
    http_server(demo_lab, "ams-edge-1", demo_lab.blobs)  # across the hub, and down from the origin
    for node in ("par-edge-1", ORIGIN):
        r = demo_lab.run(node, ["curl", "-sSf", "-m", "5", demo_lab.url("ams-edge-1", HTTP_PORT) + "/hello.txt"])
        assert r.returncode == 0, (node, r.stderr)


@needs_lab
def test_shaped_link_throughput_and_byte_counters(demo_lab, origin_http):
    url = demo_lab.url(ORIGIN, HTTP_PORT) + "/blob"
    before = {(n, p): demo_lab.iface_bytes(n, p) for n, p in
              [(ORIGIN, "hub-eu"), ("hub-eu", ORIGIN), ("hub-eu", "fra-edge-1"), ("hub-eu", "ams-edge-1")]}
    got = fetch(demo_lab, "fra-edge-1", url)  # origin -> hub -> fra: the 50mbit link is the bottleneck
    after = {k: demo_lab.iface_bytes(*k) for k in before}
    assert got["bytes"] == BLOB
    rate = got["bytes"] * 8 / got["seconds"]
    assert 0.75 * SHAPED_RATE <= rate <= 1.25 * SHAPED_RATE, f"{rate / 1e6:.1f} Mbit/s through a 50mbit link"

    def delta(node, peer, i):  # i: 0 tx, 1 rx
        return after[(node, peer)][i] - before[(node, peer)][i]

    for node, peer, i in [(ORIGIN, "hub-eu", 0), ("hub-eu", ORIGIN, 1), ("hub-eu", "fra-edge-1", 0)]:
        assert BLOB <= delta(node, peer, i) <= BLOB * 1.1, (node, peer, delta(node, peer, i))
    assert delta(ORIGIN, "hub-eu", 1) < BLOB * 0.1  # acks only, the other way
    assert delta("hub-eu", "ams-edge-1", 0) < 64 * 1024  # a link the transfer did not use


@needs_lab
def test_start_origin_serves_livez_to_an_edge(demo_lab, tmp_path):
    tokens = tmp_path / "tokens.toml"
    tokens.write_text('[[token]]\nname = "lab"\nsecret = "lab-secret-0123456789"\nscopes = ["pull"]\n')
    demo_lab.start_origin(tmp_path / "store", tokens, port=7000)
    r = demo_lab.run("par-edge-1", ["curl", "-sSf", "-m", "5", demo_lab.url(ORIGIN) + "/livez"])
    assert r.returncode == 0 and '"ok": true' in r.stdout.replace('":true', '": true'), r.stderr
    assert Topology.load(demo_lab.topology_path).origin_url == demo_lab.url(ORIGIN)


@needs_lab
def test_a_process_that_dies_at_start_fails_fast_with_its_log(demo_lab, tmp_path):
    (tmp_path / "tokens.toml").write_text("not a token file")
    t0 = time.monotonic()
    with pytest.raises(LabError, match=r"exited \(rc=2\)[\s\S]*tokens\.toml"):  # a bad token file: usage (2)
        demo_lab.start_origin(tmp_path / "store", tmp_path / "tokens.toml", port=7001)
    assert time.monotonic() - t0 < 20
    assert demo_lab.ports[ORIGIN] == 7000  # a failed start leaves the lab's URLs alone


@needs_lab
def test_start_refuses_a_port_that_already_answers(demo_lab, origin_http, tmp_path):
    (tmp_path / "tokens.toml").write_text("not a token file")
    with pytest.raises(LabError, match="already answers"):
        demo_lab.start_origin(tmp_path / "store", tmp_path / "tokens.toml", port=HTTP_PORT)


SMALL = {"site": [{"name": "hub", "region": "r", "upstream": "origin"},
                  {"name": "edge", "region": "r", "upstream": "hub"}],
         "link": [{"a": "origin", "b": "hub", "bandwidth": "100mbit"},
                  {"a": "hub", "b": "edge", "bandwidth": "100mbit"}]}


@needs_lab
def test_exit_removes_namespaces_and_processes():
    with Lab(DEMO) as lab:
        tag, workdir = lab.tag, lab.workdir
        sleeper = lab.exec("par-edge-1", ["sleep", "60"])
        assert len(ours(tag)) == 5
    assert ours(tag) == [] and sleeper.poll() is not None and not workdir.exists()


@needs_lab
def test_exit_by_exception_removes_everything_and_keeps_logs():
    with pytest.raises(RuntimeError, match="boom"):
        with Lab(Topology.from_dict(SMALL), stop_grace=0.5) as lab:
            tag, workdir = lab.tag, lab.workdir
            sleeper = lab.exec("edge", ["sh", "-c", "trap '' TERM; echo started; sleep 60"])
            time.sleep(0.2)
            raise RuntimeError("boom")
    assert ours(tag) == [] and sleeper.poll() is not None  # SIGTERM ignored: SIGKILL after the grace
    try:
        assert "started" in next((workdir / "logs").iterdir()).read_text()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@needs_lab
def test_half_built_lab_is_removed(monkeypatch):
    calls, real = [], lab_mod._sh

    def flaky(argv, **kw):
        calls.append(argv)
        if "route" in argv:  # namespaces and links exist by now
            raise LabError("injected failure")
        return real(argv, **kw)

    monkeypatch.setattr(lab_mod, "_sh", flaky)
    lab = Lab(Topology.from_dict(SMALL))
    with pytest.raises(LabError, match="injected"):
        lab.__enter__()
    assert any("netns" in c and "add" in c for c in calls)
    assert ours(lab.tag) == []


@needs_lab
def test_cleanup_stale_removes_only_dead_labs(demo_lab):
    dead = next(p for p in range(4_000_000, 3_000_000, -1) if not lab_mod._pid_alive(p))
    stale, alive = f"fab-{dead}-{os.getpid()}-edge", f"fab-1-{os.getpid()}-edge"  # pid 1 is alive
    old_logs = Path(tempfile.gettempdir()) / f"{stale}-logs"
    try:
        for ns in (stale, alive):
            subprocess.run(["ip", "netns", "add", ns], check=True)
        (old_logs / "logs").mkdir(parents=True)
        cleanup_stale()
        names = list_namespaces()
        assert stale not in names and alive in names and not old_logs.exists()
        assert len(ours(demo_lab.tag)) == 5  # this process's own lab is untouched
    finally:
        for ns in (stale, alive):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        shutil.rmtree(old_logs, ignore_errors=True)


@needs_lab
def test_large_topology_routes_across_regions(tmp_path):
    (tmp_path / "hello.txt").write_text("hi\n")
    with Lab(LARGE, scale=0.01) as lab:
        assert len(ours(lab.tag)) == 11
        http_server(lab, "sjc-edge-1", tmp_path)
        r = lab.run("lon-edge-1", ["curl", "-sSf", "-m", "5", lab.url("sjc-edge-1", HTTP_PORT) + "/hello.txt"])
        assert r.returncode == 0 and r.stdout == "hi\n", r.stderr
        hops = lab.run("lon-edge-1", ["ip", "route", "get", lab.addr("sjc-edge-1")]).stdout
        assert re.search(rf"via {re.escape(lab.link('lon-edge-1', 'hub-eu').addr_a)} .*src {lab.addr('lon-edge-1')}", hops)


@needs_lab
def test_agents_in_the_lab_carry_each_chunk_once_over_the_origin_link(tmp_path):
    """The real fabric in the demo tree: publish once, every site activates, the origin's
    uplink carries the artifact about once, and each hub-to-edge link about once."""
    sites = ["hub-eu", "fra-edge-1", "ams-edge-1", "par-edge-1"]
    tokens = tmp_path / "tokens.toml"
    tokens.write_text('[[token]]\nname = "publisher"\nsecret = "lab-publish-secret-0123"\nscopes = ["publish", "pull"]\n'
                      + "".join(f'[[token]]\nname = "{s}"\nsite = "{s}"\nsecret = "{s}-lab-secret-0123"\nscopes = ["pull"]\n'
                                for s in sites))
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "weights.bin").write_bytes(os.urandom(3_000_000))
    env = {"FABRIC_CONFIG": os.devnull}
    with Lab(DEMO, rates={SHAPED: "100mbit"}, stop_grace=1) as lab:  # `fabric origin` lingers after TERM once an SSE client has gone
        lab.start_origin(tmp_path / "store", tokens, env=env)
        for s in sites:
            cfg = lab.write_agent_config(s, tmp_path / s, f"{s}-lab-secret-0123", ["model:prod"], tokens,
                                         extra={"report_interval": 0.5})
            lab.start_agent(s, cfg, env=env)
        pairs = [(ORIGIN, "hub-eu")] + [("hub-eu", s) for s in sites[1:]]
        before = {p: lab.iface_bytes(*p)[0] for p in pairs}
        r = lab.run(ORIGIN, [*fabric_command(), "publish", tmp_path / "src", "-a", "model", "--version", "v1",
                             "--channel", "prod", "--origin", lab.url(ORIGIN), "--token", "lab-publish-secret-0123"],
                    env={**os.environ, **env})
        assert r.returncode == 0, r.stderr
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not all((tmp_path / s / "current" / "model").is_symlink() for s in sites):
            time.sleep(0.1)
        missing = [s for s in sites if not (tmp_path / s / "current" / "model").is_symlink()]
        assert not missing, "\n".join(lab.logs(s)[-2000:] for s in missing)
        for p in pairs:
            # Each chunk crosses each link once: the receiving site fetched exactly the
            # artifact's bytes, all from its own upstream (its log's by_source).
            fetched = [json.loads(line[line.index("{"):]) for line in lab.logs(p[1]).splitlines()
                       if '"version fetched"' in line]
            assert fetched and fetched[-1]["by_source"] == {lab.url(p[0]): 3_000_000}, (p, fetched)
            # On the interface: the payload plus TCP/IP and frame overhead and, since relays
            # re-serve the control plane (events, channel and manifest reads, report answers),
            # the edges' control traffic, which crosses the hub link instead of the origin's.
            # (Until a relay's re-served event stream stopped spinning on `: keepalive`, that
            # was 1.20-1.25x of this 3 MB artifact at the edges.) A second copy would be >= 2x.
            sent = lab.iface_bytes(*p)[0] - before[p]
            print(f"{p[0]} -> {p[1]}: {sent:,} bytes on the interface for 3,000,000 of payload ({sent / 3e6:.3f}x)")
            assert 3_000_000 <= sent <= 3_000_000 * 1.10, (p, sent, lab.logs(p[1])[-2000:])
