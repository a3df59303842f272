"""Where a site fetches from: its chunk sources in preference order, and chunk owners.

Sources come from the config's `upstreams` (relays, asked first) or from the topology
(`fabric.core.topology.Topology.sources_for`: relays that pull through, peers that only
answer from what they hold), and the origin always last (several origins over one store:
all of them, in order, `agents.site.origins`). Hubs that share the origin's
uplink split it by chunk owner (`owner_index`): each fetches its own share from the
origin, and the others' shares from them first.
"""

from __future__ import annotations

from fabric.wire.protocol import PEER_HEADER
from fabric.core.topology import Topology, owner_index
from fabric.pull import Upstream
from fabric.transfer import FetchOptions, Forward, Inflight
from fabric.wire.client import OriginClient

from agents.site.config import SiteConfig, SyncOptions


class SourcePlan:
    """The clients a site fetches from, planned once from its config."""

    def __init__(self, cfg: SiteConfig, origin: OriginClient, others: list[OriginClient] = ()):
        self.cfg, self.origin = cfg, origin
        self.others = list(others)  # the other origins of the same store, asked after `origin`
        self.sources = self._plan_sources()
        self.owners = self._plan_owners()

    def _plan_sources(self) -> list[OriginClient]:
        """Chunk sources in preference order; the origin is always last."""
        if self.cfg.upstreams:
            urls = [(u, True) for u in self.cfg.upstreams]
        elif self.cfg.topology:
            topo = Topology.load(self.cfg.topology)
            urls = [(s.url, s.pull_through) for s in topo.sources_for(self.cfg.site)[:-1] if s.url]
        else:
            urls = []
        clients = [OriginClient(u, self.cfg.token, headers=None if relay else {PEER_HEADER: "1"})
                   for u, relay in urls]
        return clients + [self.origin, *self.others]

    def _plan_owners(self) -> list[OriginClient | None]:
        """Sibling hubs sharing the origin's uplink (None for this site), ordered by name."""
        if self.cfg.upstreams or not self.cfg.topology:
            return []
        peers = Topology.load(self.cfg.topology).shard_peers(self.cfg.site)
        return [None if p.name == self.cfg.site else OriginClient(p.url, self.cfg.token) for p in peers]

    def owner(self, chunk_id: str) -> OriginClient | None:
        """The sibling hub to fetch `chunk_id` from first, if another hub owns it."""
        return self.owners[owner_index(chunk_id, len(self.owners))] if self.owners else None

    def upstream(self, inflight: Inflight, forward: Forward | None = None) -> Upstream:
        """What the site's pulls (`fabric.pull.pull`) fetch through; `forward` gets their codec frames."""
        return Upstream(self.sources, fetch_options(self.cfg.sync), inflight, self.owner, forward)

    def clients(self) -> list[OriginClient]:
        """Every client of the plan, once (to close them)."""
        return list({id(c): c for c in self.sources + [o for o in self.owners if o]}.values())


def fetch_options(sync: SyncOptions) -> FetchOptions:
    return FetchOptions(connections=sync.connections, max_rate=sync.max_rate, stall_timeout=sync.stall_timeout,
                        give_up_after=sync.give_up_after)
