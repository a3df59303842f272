"""A site's origins (agents.site.config `origin`/`origins`, agents.site.origins): the list,
its checks, and where the agent asks each origin (control plane and chunk sources, in order)."""

from __future__ import annotations

import asyncio
import re

import pytest

from fabric.errors import ConfigError

from agents.site.config import SiteConfig
from agents.site.control import UpstreamChain
from agents.site.origins import origin_clients
from agents.site.upstream import SourcePlan

BASE = {"site": "s1", "data": "/tmp/x", "listen": "127.0.0.1:7070", "token": "t" * 20, "follow": ["m:prod"]}


def test_origin_alone_is_a_list_of_one():
    cfg = SiteConfig.from_dict(dict(BASE, origin="http://a:7000/"), "site.toml")
    assert cfg.origins == ("http://a:7000",) and cfg.origin == "http://a:7000"


def test_origins_keep_their_order_and_the_first_is_the_origin():
    cfg = SiteConfig.from_dict(dict(BASE, origins=["http://b:7000", "http://a:7000/"]), "site.toml")
    assert cfg.origins == ("http://b:7000", "http://a:7000") and cfg.origin == "http://b:7000"


@pytest.mark.parametrize("over, message", [
    ({}, "origin: give exactly one of origin or origins"),
    ({"origin": "http://a:7000", "origins": ["http://b:7000"]}, "origin: give exactly one"),
    ({"origins": []}, "origins: must list at least one"),
    ({"origins": ["http://a:7000", "ftp://b"]}, "origins: must be a list of http(s) URLs"),
    ({"origins": "http://a:7000"}, "origins: must be a list"),
    ({"origins": ["http://a:7000", "http://a:7000/"]}, "origins: lists an origin twice"),
])
def test_bad_origins_name_the_key(over, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        SiteConfig.from_dict(dict(BASE, **over), "site.toml")


def test_every_origin_is_a_source_in_order_after_the_relays():
    cfg = SiteConfig.from_dict(dict(BASE, origins=["http://a:7000", "http://b:7000"],
                                    upstreams=["http://hub:7070"]), "site.toml")
    origins = origin_clients(cfg)
    plan = SourcePlan(cfg, origins[0], origins[1:])
    assert [c.url for c in plan.sources] == ["http://hub:7070", "http://a:7000", "http://b:7000"]
    chain = UpstreamChain([plan.sources[0], *origins[:-1]], origins[-1])
    assert [c.url for c in chain.sources] == ["http://hub:7070", "http://a:7000", "http://b:7000"]

    async def close():
        for c in plan.clients():
            await c.close()
    asyncio.run(close())
