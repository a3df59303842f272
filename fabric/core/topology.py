"""Topology: sites, their links, and where each site should fetch from.

A topology file (TOML, see topology/demo.toml) names the origin and the sites; each
site has a region, an upstream (the origin or another site) and the URL its agent
serves on; links carry a bandwidth and a latency. The file is validated as a whole:
unknown keys, unknown upstreams, cycles and malformed rates are errors naming the
offending entry.

The planner turns the tree into an ordered source list per site: its upstream relay
first (which fetches each chunk from *its* upstream once, however many children ask),
then its siblings (peers under the same upstream, same region first; asked only for
what they already hold), the origin last. Several sites right under the origin split
its uplink by chunk owner (`shard_peers`, `owner_index`). So the origin's uplink
carries each chunk once per version, and a dead relay costs its children only a detour.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fabric.config import parse_bit_rate, parse_duration, read_toml
from fabric.errors import ConfigError

ORIGIN = "origin"
_SITE_KEYS = {"name", "region", "upstream", "url"}
_LINK_KEYS = {"a", "b", "bandwidth", "latency"}


@dataclass(frozen=True)
class Site:
    name: str
    region: str
    upstream: str  # another site's name, or "origin"
    url: str | None = None


@dataclass(frozen=True)
class Link:
    a: str
    b: str
    bandwidth: float  # bits per second
    latency: float = 0.0  # seconds, one way


@dataclass(frozen=True)
class Source:
    """One place to fetch from, in the order a site should try them."""

    name: str
    url: str | None
    pull_through: bool  # may it fetch from its own upstream on our behalf?


@dataclass(frozen=True)
class Topology:
    origin_url: str | None
    sites: dict[str, Site]
    links: tuple[Link, ...]

    @classmethod
    def load(cls, path: str | Path) -> "Topology":
        return cls.from_dict(read_toml(path, "topology"), str(path))

    @classmethod
    def from_dict(cls, data: dict, where: str = "topology") -> "Topology":
        unknown = set(data) - {"name", "origin", "site", "link"}
        if unknown:
            raise ConfigError(f"{where}: unknown key {sorted(unknown)[0]!r}")
        origin = data.get("origin", {})
        if not isinstance(origin, dict) or set(origin) - {"url"}:
            raise ConfigError(f"{where}: [origin] takes only 'url'")
        sites = {}
        for i, raw in enumerate(_tables(data, "site", where)):
            site = _site(raw, f"{where}: site[{i}]")
            if site.name in sites or site.name == ORIGIN:
                raise ConfigError(f"{where}: site name {site.name!r} is used twice (or is 'origin')")
            sites[site.name] = site
        links = tuple(_link(raw, f"{where}: link[{i}]", sites) for i, raw in enumerate(_tables(data, "link", where)))
        topo = cls(origin.get("url"), sites, links)
        topo._check_tree(where)
        return topo

    def _check_tree(self, where: str) -> None:
        for site in self.sites.values():  # all upstreams first: the walk below follows them
            if site.upstream != ORIGIN and site.upstream not in self.sites:
                raise ConfigError(f"{where}: site {site.name!r} has unknown upstream {site.upstream!r}")
        for site in self.sites.values():
            seen, node = {site.name}, site.upstream
            while node != ORIGIN:
                if node in seen:
                    raise ConfigError(f"{where}: upstreams of {site.name!r} form a cycle")
                seen.add(node)
                node = self.sites[node].upstream

    # --- planning ------------------------------------------------------------------

    def site(self, name: str) -> Site:
        if name not in self.sites:
            raise ConfigError(f"site {name!r} is not in the topology (known: {', '.join(sorted(self.sites))})")
        return self.sites[name]

    def children(self, name: str) -> list[Site]:
        return [s for s in self.sites.values() if s.upstream == name]

    def depth(self, name: str) -> int:
        return 0 if name == ORIGIN else 1 + self.depth(self.site(name).upstream)

    def sources_for(self, name: str) -> list[Source]:
        """Where `name` should fetch chunks from, best first: upstream, siblings, origin."""
        me = self.site(name)
        out: list[Source] = []
        if me.upstream != ORIGIN:
            up = self.sites[me.upstream]
            out.append(Source(up.name, up.url, pull_through=True))
            siblings = sorted((s for s in self.children(me.upstream) if s.name != name),
                              key=lambda s: (s.region != me.region, s.name))
            out += [Source(s.name, s.url, pull_through=False) for s in siblings]
        out.append(Source(ORIGIN, self.origin_url, pull_through=False))
        return out

    def shard_peers(self, name: str) -> list[Site]:
        """The sites right under the origin, if `name` is one of several; else [].

        They split the origin's uplink: each chunk has one owner among them
        (`owner_index`), which fetches it from the origin; the others fetch it from
        the owner. So each chunk leaves the origin once however many hubs there are.
        """
        me = self.site(name)
        peers = sorted((s for s in self.sites.values() if s.upstream == ORIGIN), key=lambda s: s.name)
        return peers if me.upstream == ORIGIN and len(peers) > 1 and all(p.url for p in peers) else []

    def link(self, a: str, b: str) -> Link | None:
        for link in self.links:
            if {link.a, link.b} == {a, b}:
                return link
        return None

    def origin_uplink_bps(self) -> float | None:
        """The slowest link leaving the origin: what bounds a fan-out's makespan."""
        rates = [l.bandwidth for l in self.links if ORIGIN in (l.a, l.b)]
        return min(rates) if rates else None


def parse_bandwidth(text: object, where: str) -> float:
    """A link's bandwidth ('1gbit', '100mb') → bits per second; ConfigError naming `where`."""
    try:
        return parse_bit_rate(text)
    except ValueError as e:
        raise ConfigError(f"{where}: bandwidth {e}") from None


def parse_latency(text: object, where: str) -> float:
    """A link's latency ('20ms', '250us'; the unit is required) → seconds; ConfigError naming `where`."""
    try:
        return parse_duration(text, bare_seconds=False)
    except ValueError:
        raise ConfigError(f"{where}: latency {text!r} is not like '20ms'") from None


def _tables(data: dict, key: str, where: str) -> list[dict]:
    raw = data.get(key, [])
    if not isinstance(raw, list) or not all(isinstance(t, dict) for t in raw):
        raise ConfigError(f"{where}: {key!r} must be [[{key}]] tables")
    return raw


def _site(raw: dict, where: str) -> Site:
    unknown = set(raw) - _SITE_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown key {sorted(unknown)[0]!r}")
    for key in ("name", "region", "upstream"):
        if not isinstance(raw.get(key), str) or not raw[key]:
            raise ConfigError(f"{where}.{key}: must be a non-empty string")
    url = raw.get("url")
    if url is not None and not (isinstance(url, str) and url.startswith(("http://", "https://"))):
        raise ConfigError(f"{where}.url: must be an http(s) URL")
    return Site(raw["name"], raw["region"], raw["upstream"], url)


def _link(raw: dict, where: str, sites: dict[str, Site]) -> Link:
    unknown = set(raw) - _LINK_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown key {sorted(unknown)[0]!r}")
    for end in ("a", "b"):
        if raw.get(end) != ORIGIN and raw.get(end) not in sites:
            raise ConfigError(f"{where}.{end}: unknown site {raw.get(end)!r}")
    if raw["a"] == raw["b"]:
        raise ConfigError(f"{where}: a link joins two different sites, not {raw['a']!r} to itself")
    return Link(raw["a"], raw["b"], parse_bandwidth(raw.get("bandwidth"), f"{where}.bandwidth"),
                parse_latency(raw.get("latency", "0ms"), f"{where}.latency"))


def owner_index(chunk_id: str, peers: int) -> int:
    """Which of `peers` sites owns a chunk: a stable hash of its id."""
    return int(chunk_id[-16:], 16) % peers
