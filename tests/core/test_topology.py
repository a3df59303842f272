"""fabric.core.topology: the file format, its validation, and the per-site source plan."""

from __future__ import annotations

from pathlib import Path

import pytest

from fabric.errors import ConfigError
from fabric.core.topology import ORIGIN, Topology, parse_bandwidth, parse_latency

ROOT = Path(__file__).resolve().parents[2]
DEMO, LARGE = ROOT / "topology" / "demo.toml", ROOT / "topology" / "large.toml"


def site(name, upstream="origin", region="eu", **kw):
    return {"name": name, "region": region, "upstream": upstream, **kw}


def link(a, b, bandwidth="1gbit", **kw):
    return {"a": a, "b": b, "bandwidth": bandwidth, **kw}


def topo(sites, links=(), **kw) -> Topology:
    return Topology.from_dict({"origin": {"url": "http://o:7000"}, "site": list(sites), "link": list(links), **kw})


def names(sources) -> list[str]:
    return [s.name for s in sources]


# --- the planner ----------------------------------------------------------------------------

def test_edge_fetches_from_upstream_then_siblings_then_origin():
    t = Topology.load(DEMO)
    srcs = t.sources_for("fra-edge-1")
    assert names(srcs) == ["hub-eu", "ams-edge-1", "par-edge-1", ORIGIN]
    assert [s.pull_through for s in srcs] == [True, False, False, False]
    assert srcs[0].url == "http://127.0.0.1:7100" and srcs[-1].url == "http://127.0.0.1:7000"


def test_hub_gets_only_the_origin():
    for path, hub in ((DEMO, "hub-eu"), (LARGE, "hub-us"), (LARGE, "hub-eu")):
        assert names(Topology.load(path).sources_for(hub)) == [ORIGIN]


def test_siblings_in_the_same_region_come_first():
    t = Topology.load(LARGE)
    assert names(t.sources_for("iad-edge-1")) == ["hub-us", "ord-edge-1", "sjc-edge-1", "yyz-edge-1", ORIGIN]
    # yyz is alone in its region: its siblings follow in name order
    assert names(t.sources_for("yyz-edge-1")) == ["hub-us", "iad-edge-1", "ord-edge-1", "sjc-edge-1", ORIGIN]


def test_other_region_sibling_sorts_after_same_region_regardless_of_name():
    t = topo([site("hub"), site("z-edge", "hub", "eu"), site("a-edge", "hub", "us"), site("m-edge", "hub", "eu")])
    assert names(t.sources_for("z-edge")) == ["hub", "m-edge", "a-edge", ORIGIN]


def test_deep_tree_relay_first_and_only_own_siblings():
    t = topo([site("hub"), site("mid", "hub"), site("leaf", "mid"), site("other", "hub")])
    assert names(t.sources_for("leaf")) == ["mid", ORIGIN]
    assert names(t.sources_for("mid")) == ["hub", "other", ORIGIN]
    assert t.depth("leaf") == 3 and t.depth(ORIGIN) == 0


def test_unknown_site_is_a_config_error():
    with pytest.raises(ConfigError, match="'nowhere'"):
        Topology.load(DEMO).sources_for("nowhere")


def test_link_lookup_and_origin_uplink():
    t = Topology.load(LARGE)
    assert t.link("hub-eu", "origin").latency == pytest.approx(0.040)
    assert t.link("iad-edge-1", "fra-edge-1") is None
    assert t.origin_uplink_bps() == 1e9
    assert Topology.load(DEMO).origin_uplink_bps() == 200e6


# --- the shipped files -----------------------------------------------------------------------

@pytest.mark.parametrize("path", sorted((ROOT / "topology").glob("*.toml")), ids=lambda p: p.name)
def test_shipped_topologies_load_and_every_site_has_an_upstream_link(path):
    t = Topology.load(path)
    assert t.sites and t.origin_url
    for s in t.sites.values():
        assert t.link(s.name, s.upstream) is not None, f"{s.name} has no link to {s.upstream}"
        assert t.sources_for(s.name)[-1].name == ORIGIN


def test_large_topology_shape():
    t = Topology.load(LARGE)
    hubs = [s for s in t.sites.values() if s.upstream == ORIGIN]
    edges = [s for s in t.sites.values() if s.upstream != ORIGIN]
    assert len(hubs) == 2 and 6 <= len(edges) <= 8
    assert {s.region for s in hubs} == {"us", "eu"}
    assert all(t.link(e.name, e.upstream).bandwidth >= 5e9 for e in edges)


# --- validation: each error names what is wrong ---------------------------------------------------

@pytest.mark.parametrize("data, needle", [
    ({"site": [site("a", "ghost")]}, r"site 'a' has unknown upstream 'ghost'"),
    # the bad upstream sits on a site listed after one that leads to it
    ({"site": [site("a", "b"), site("b", "ghost")]}, r"site 'b' has unknown upstream 'ghost'"),
    ({"site": [site("a", "b"), site("b", "a")]}, r"upstreams of 'a' form a cycle"),
    ({"site": [site("a", "a")]}, r"upstreams of 'a' form a cycle"),
    ({"site": [site("a"), site("a")]}, r"site name 'a' is used twice"),
    ({"site": [site("origin")]}, r"site name 'origin'"),
    ({"site": [site("a")], "link": [link("a", "nowhere")]}, r"link\[0\]\.b: unknown site 'nowhere'"),
    ({"site": [site("a")], "link": [link("ghost", "a")]}, r"link\[0\]\.a: unknown site 'ghost'"),
    ({"site": [site("a")], "link": [link("a", "a")]}, r"link\[0\]: .*'a' to itself"),
    ({"site": [site("a")], "link": [link("a", "origin", "fast")]}, r"link\[0\]\.bandwidth: bandwidth 'fast'"),
    ({"site": [site("a")], "link": [link("a", "origin", "0mbit")]}, r"link\[0\]\.bandwidth: .*more than zero"),
    ({"site": [site("a")], "link": [{"a": "a", "b": "origin"}]}, r"link\[0\]\.bandwidth"),
    ({"site": [site("a")], "link": [link("a", "origin", latency="soon")]}, r"link\[0\]\.latency: latency 'soon'"),
    ({"site": [site("a")], "link": [link("a", "origin", speed=1)]}, r"link\[0\]: unknown key 'speed'"),
    ({"site": [site("a", colour="red")]}, r"site\[0\]: unknown key 'colour'"),
    ({"site": [{"name": "a", "upstream": "origin"}]}, r"site\[0\]\.region: must be a non-empty string"),
    ({"site": [site("a", url="ftp://x")]}, r"site\[0\]\.url: must be an http"),
    ({"sites": []}, r"unknown key 'sites'"),
    ({"origin": {"url": "http://o", "port": 1}}, r"\[origin\] takes only 'url'"),
    ({"site": {"name": "a"}}, r"'site' must be \[\[site\]\] tables"),
])
def test_validation_errors_name_the_bad_entry(data, needle):
    with pytest.raises(ConfigError, match=needle):
        Topology.from_dict(data, "t.toml")


def test_load_reports_unreadable_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read topology"):
        Topology.load(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[[site]\nname = 1\n")
    with pytest.raises(ConfigError, match="bad.toml"):
        Topology.load(bad)


# --- rates and durations ----------------------------------------------------------------------

@pytest.mark.parametrize("text, bps", [
    ("1gbit", 1e9), ("200mbit", 200e6), ("1.5Gbit", 1.5e9), ("64kbit", 64e3), ("9600bit", 9600),
    (" 10 gbit ", 10e9), ("100mb", 800e6), ("100mbps", 800e6), ("1GB", 8e9),
])
def test_parse_bandwidth(text, bps):
    assert parse_bandwidth(text, "x") == pytest.approx(bps)


@pytest.mark.parametrize("text", ["", "fast", "1000", "1tbit", "-1mbit", "0gbit", "1 g bit", None, 5])
def test_parse_bandwidth_rejects(text):
    with pytest.raises(ConfigError, match=r"^where: bandwidth"):
        parse_bandwidth(text, "where")


@pytest.mark.parametrize("text, seconds", [("20ms", 0.02), ("1s", 1.0), ("250us", 250e-6), ("0ms", 0.0), ("1.5ms", 0.0015)])
def test_parse_latency(text, seconds):
    assert parse_latency(text, "x") == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["20", "soon", "5 min", "-3ms", "20MS", None])
def test_parse_latency_rejects(text):
    with pytest.raises(ConfigError, match=r"^where: latency"):
        parse_latency(text, "where")
