"""The origins a site talks to: one, or several over one store, in the order `site.toml` lists them.

Several origin processes may serve one store (an S3 bucket); they share channels, a
move log (each origin's event stream announces the others' moves within a second) and
the site reports (docs/protocol.md "Several origins"). A site lists them all
(`origins = [...]`, agents.site.config) and fails over between them, in the two places
it already fails over between sources:

* the control plane (`agents.site.control.UpstreamChain`): events, channel reads,
  manifests, listings, statements and reports go to the first source that answers:
  the upstream relays, then the origins in order. An origin that cannot be reached (or
  answers 5xx) is skipped for `DEAD_FOR` seconds and the next one asked; an event stream
  from any but the first source ends after `RETRY_PREFERRED` seconds, so the follower
  comes back to the first origin once it lives again. A stream from another origin
  names another epoch: the follower re-syncs, so nothing is missed across the switch.
* chunks (`agents.site.upstream.SourcePlan`, `fabric.transfer`): the origins are the
  last sources, in order; a dead one is benched with backoff like any source and its
  batches go to the next.

`origin_clients` makes one client per origin; the first is `SiteAgent.origin`.
"""

from __future__ import annotations

from fabric.wire.client import OriginClient

from agents.site.config import SiteConfig


def origin_clients(cfg: SiteConfig) -> list[OriginClient]:
    """One client per configured origin, in preference order."""
    return [OriginClient(url, cfg.token) for url in cfg.origins]
