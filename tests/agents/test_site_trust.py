"""The site's trust policy at start-up (agents/site/config.py, agents/site/trust.py): a trust
file that is missing or does not check stops the agent with a message naming it; without
one the agent warns loudly and every channel says "unsigned", in its status and its metrics.
(The checks themselves, against real processes and a lying origin: tests/e2e/test_signed_versions.py.)"""

from __future__ import annotations

import logging

import pytest
from prometheus_client import CollectorRegistry

from fabric.errors import TrustPolicyInvalid
from fabric.trust import Key, TrustPolicy

from agents.site.agent import SiteAgent
from agents.site.config import SiteConfig
from helpers.agent import write_config
from helpers.origin import fabric


def _cfg(tmp_path, **over) -> dict:
    return {"site": "s1", "data": str(tmp_path / "d"), "listen": "127.0.0.1:7070", "origin": "http://127.0.0.1:1",
            "token": "t" * 20, "follow": ["m:prod"], **over}


@pytest.mark.parametrize("content, named", [
    (None, "cannot read the trust file"),
    ("[[rules]]\nartifacts = 3\n", "rules[0]"),
    ("not = [toml", "not valid TOML"),
])
def test_a_trust_file_that_does_not_check_is_a_start_up_error_naming_it(tmp_path, content, named):
    trust = tmp_path / "trust.toml"
    if content is not None:
        trust.write_text(content)
    with pytest.raises(TrustPolicyInvalid) as e:
        SiteConfig.from_dict(_cfg(tmp_path, trust="trust.toml"), "site.toml", base=tmp_path)
    assert str(e.value).startswith("site.toml: trust: ") and str(trust) in str(e.value) and named in str(e.value)


def test_the_agent_refuses_to_start_with_a_bad_trust_file(tmp_path):
    (tmp_path / "trust.toml").write_text("[root]\nkeys = [\"nope\"]\n")
    p = fabric("agent", "--config", write_config(tmp_path / "site.toml", _cfg(tmp_path, trust="trust.toml")),
               timeout=60)
    assert p.returncode == 2 and "trust.toml" in p.stderr and "root" in p.stderr, p.stderr


def test_a_good_trust_file_is_parsed_at_start_up(tmp_path):
    policy = TrustPolicy()
    key = Key.from_seed(bytes(32))
    policy.add(key.public, ["m*"])
    policy.save(tmp_path / "trust.toml")
    cfg = SiteConfig.from_dict(_cfg(tmp_path, trust="trust.toml"), "site.toml", base=tmp_path)
    assert cfg.trust_file == tmp_path / "trust.toml" and cfg.trust.public(key.keyid) == key.public
    agent = SiteAgent(cfg)
    assert agent.trust.enabled and agent.status()["trust"] == {"policy": str(tmp_path / "trust.toml"),
                                                               "delegations": 0, "error": None}
    assert agent.status()["channels"][0]["trust"] is None  # not checked yet


def test_without_a_trust_policy_the_agent_warns_and_says_unsigned(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        agent = SiteAgent(SiteConfig.from_dict(_cfg(tmp_path), "site.toml", base=tmp_path))
    assert any("unsigned: no trust policy" in r.getMessage() for r in caplog.records)
    ch = agent.status()["channels"][0]
    assert ch["trust"] == "unsigned" and ch["trust_error"] is None and ch["statement_expires"] is None
    registry = CollectorRegistry()
    agent.metrics.register(registry)
    sample = {"artifact": "m", "channel": "prod"}
    assert registry.get_sample_value("fabric_agent_channel_trust", dict(sample, state="unsigned")) == 1
    assert registry.get_sample_value("fabric_agent_channel_trust", dict(sample, state="verified")) == 0
    assert registry.get_sample_value("fabric_agent_channel_stale", sample) == 0
