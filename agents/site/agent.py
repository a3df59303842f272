"""The site agent: follow channels, replicate versions, activate them atomically, relay.

One agent runs per site (or per node). `SiteAgent` holds the site's state and wires
the parts, one module per concern:

1. following (`agents.site.follow`): the origin's event stream and periodic re-reads
   set each followed channel's target, so a dropped event costs a delay, never a
   missed version;
2. deploying (`agents.site.deploy`): with a trust policy, only a move whose signed
   statements verify (`agents.site.trust`) is deployed; each target is pulled through `fabric.pull` from
   the planned sources (`agents.site.upstream`: upstream relay, peers, origin last),
   materialised under `versions/<artifact>/<version>/`, and only then activated by
   flipping `current/<artifact>` (`agents.site.layout`); then rolled out to the
   site's workers (`agents.site.rollout`); a channel's staged version is fetched and
   held beforehand without activating it (`agents.site.staging`), so its promote is a flip;
3. relaying (`agents.site.relay`): the site serves its chunks to the sites below it,
   with pull-through for the chunks it lacks;
4. retention (`agents.site.retention`): the last `retention.keep` versions (plus the
   active and pinned ones) stay, and chunks no kept version needs are collected;
5. reporting: its state goes upstream, for `fabric status`, with its subtree's reports
   (`agents.site.reports`);
6. the control plane (`agents.site.control`, `agents.site.event_relay`): events, channel
   reads, manifests and reports go through the site's upstream relay (the origin only as
   the fallback), and the site re-serves its own stream and control reads to the sites
   below it, so the origin holds streams and reports from its direct children only.

Its HTTP app and entry point are in `agents.site.app`.
"""

from __future__ import annotations

import asyncio
import time

from fabric.core.manifest import check_name
from fabric.core.topology import ORIGIN, Topology
from fabric.errors import FabricError, NotFound
from fabric.logs import get_logger
from fabric.pacing import return_freed_payloads
from fabric.store.registry import Registry
from fabric.store.store import Store, open_store
from fabric.transfer import Inflight
from fabric.wire.client import OriginClient
from fabric.wire.framecache import Forwarded

from agents.site.config import SiteConfig
from agents.site.control import UpstreamChain, relay_urls
from agents.site.event_relay import EventRelay, ReadRelay
from agents.site.deploy import Deployer
from agents.site.follow import ChannelStatus, Follower
from agents.site.layout import Layout, StateFile
from agents.site.metrics import AgentMetrics
from agents.site.origins import origin_clients
from agents.site.relay import Relay
from agents.site.reports import Subtree
from agents.site.retention import Pruner
from agents.site.rollout import Rollout
from agents.site.trust import SiteTrust
from agents.site.servers import start_members
from agents.site.staging import Stager
from agents.site.upstream import SourcePlan

log = get_logger("agent")


class SiteAgent:
    def __init__(self, cfg: SiteConfig):
        return_freed_payloads()  # a long-lived process: freed chunk payloads go back to the OS
        self.cfg = cfg
        self.layout = Layout(cfg.data)
        self.layout.sweep_staging()
        self.store: Store = open_store(self.layout.store_dir)
        self.registry = Registry(self.store)
        self.statefile = StateFile(self.layout)
        self.metrics = AgentMetrics()  # served once `agents.site.app.create_app` registers them
        self.metrics.high_watermark.set(cfg.retention.high_watermark)
        self.origins = origin_clients(cfg)  # several over one store: failed over (agents.site.origins)
        self.origin = self.origins[0]
        self.plan = SourcePlan(cfg, self.origin, self.origins[1:])
        self.event_relay = EventRelay()  # the upstream's events, re-served to the sites below
        self.control = UpstreamChain([OriginClient(u, cfg.token, connections=4) for u in relay_urls(cfg)]
                                     + self.origins[:-1], self.origins[-1], on_event=self._upstream_event)
        self.reads = ReadRelay(self.store, self.control)  # control reads, re-served
        self.subtree = Subtree(cfg.site, forget_after=max(60.0, 12 * cfg.report_interval))
        self.forwarded = Forwarded()  # the delta frames this site fetches, for its children (`fabric.wire.chunks`)
        self.upstream = self.plan.upstream(Inflight(), forward=self.forwarded.put)
        self.upstream_name, self.source_names = _link_names(cfg)  # for the report (the status page's tree)
        self.channels = {a: ChannelStatus(a, c, active=self.layout.active(a)) for a, c in cfg.follow}
        # Without a policy a site only keeps envelopes for the sites below: the nearest source that
        # answers decides (a relay asked its own upstream), so a rollout never asks the origin per site.
        statement_sources = self.plan.sources if cfg.trust else [self.control]
        self.trust = SiteTrust(cfg.trust, self.layout, self.control, statement_sources, self.metrics, self.channels,
                               cfg.trust_file)
        self.deployer = Deployer(self)
        self.stager = Stager(self)  # staged versions: fetched and held, not activated (preheat)
        self.follower = Follower(self.control, self.channels, cfg.sync.resync_interval, self.deployer.wake,
                                 on_resync=self.trust.refresh_delegations, staged=self.stager.want)
        self.relay = Relay(self.store, self.upstream, self.metrics)
        self.pruner = Pruner(self.layout, self.registry, cfg.retention, self.channels, self.metrics,
                             also_keep=lambda artifact: self.stager.also_keep(artifact)
                             | self.rollout.in_use(artifact))
        self.ready = False
        self.rollout = Rollout(self, cfg.workers)  # hot-load: workers, canary, rollback

    @property
    def state(self):
        return self.statefile.state

    def tasks(self) -> list:
        """The coroutines that run for the agent's life (started by the app)."""
        return [self.follower.follow_events(), self.follower.resync_periodically(), self.report_loop(),
                self.trust.watch()] + \
            [self.deployer.loop(a) for a in self.channels] + [self.stager.loop(a) for a in self.channels] + \
            start_members(self.rollout, self.cfg.servers)

    def set_active_metric(self) -> None:
        self.metrics.set_active({a: ch.active for a, ch in self.channels.items()})

    async def reject_version(self, artifact: str, version: str, previous: str | None, reason: str) -> None:
        """A version failed its canary here (`agents.site.rollout`): mark it bad, put `previous` back."""
        await self.deployer.reject(artifact, version, previous, reason)

    async def pin(self, artifact: str, version: str, pinned: bool) -> None:
        """Keep `artifact@version` whatever retention says (or stop keeping it)."""
        check_name("artifact", artifact)
        check_name("version", version)
        key = f"{artifact}@{version}"
        if pinned:
            if version not in await asyncio.to_thread(self.layout.materialised, artifact):
                raise NotFound(f"{key} is not materialised at site {self.cfg.site}")
            self.state.pins.add(key)
        else:
            self.state.pins.discard(key)
        await self.statefile.save()

    def status(self) -> dict:
        self.trust.tick()
        return {"site": self.cfg.site, "ready": self.ready, "trust": self.trust.status(),
                "channels": [c.to_json() for c in self.channels.values()],
                "pins": sorted(self.state.pins), "bad": self.state.bad,
                "disk_used": round(self.layout.disk_usage(), 4), "workers": self.rollout.status(),
                "rollouts": self.rollout.rollouts_json(), "upstream": self.upstream_name,
                "fetched": {self.source_names.get(u, u): n for u, n in self.metrics.fetched.items()},
                "at": time.time()}

    def _upstream_event(self, event: str, data: dict, resumed: bool) -> None:
        """Each event of the upstream stream: re-served, and what is kept about its artifact dropped."""
        self.event_relay.feed(event, data, resumed)
        if event == "hello" and not resumed:
            self.reads.forget_all()
        elif isinstance(data.get("artifact"), str):
            self.reads.forget(data["artifact"])

    async def report_loop(self) -> None:
        """Tell the upstream relay (or the origin) how this site and the sites below it are doing."""
        while True:
            try:
                for body in self.subtree.bodies(self.status()):
                    await self.control.report_site(self.cfg.site, body)
            except FabricError as e:
                log.warning("status report failed", error=e.message)
            except Exception as e:  # noqa: BLE001 - a bug in a report must not end the reports for good
                log.error("status report failed", error=f"{type(e).__name__}: {e}")
            await asyncio.sleep(self.cfg.report_interval)

    async def close(self) -> None:
        """Close every client the agent opened."""
        for client in {id(c): c for c in self.plan.clients() + self.control.sources}.values():
            await client.close()


def _link_names(cfg: SiteConfig) -> tuple[str, dict[str, str]]:
    """The site's upstream (a site name, "origin", or the first `upstreams` URL) and a name for
    each source URL the topology names ("origin" for the origin), as the status report says them."""
    names = {u.rstrip("/"): ORIGIN for u in cfg.origins}  # keyed as the clients write their URLs
    topo = Topology.load(cfg.topology) if cfg.topology else None
    if topo is not None:
        names.update({s.url.rstrip("/"): s.name for s in topo.sites.values() if s.url})
        if topo.origin_url:
            names[topo.origin_url.rstrip("/")] = ORIGIN
    if cfg.upstreams:
        return names.get(cfg.upstreams[0], cfg.upstreams[0]), names
    if topo is not None and cfg.site in topo.sites:
        return topo.sites[cfg.site].upstream, names
    return ORIGIN, names
