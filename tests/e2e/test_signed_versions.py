"""Signed versions at the site, end to end: a real origin, a lying origin in front of it
(tests/helpers/lying_origin.py) and real `fabric agent` processes with a trust policy.

* Every attack of the threat model (docs/trust.md) is refused with its code in /v1/site,
  counted in the refusal metric, before any chunk is fetched; the signed version keeps
  serving and nothing of the attacker's version appears under versions/ or current/:
  withheld statements, a channel moved by an untrusted key, by a key out of its scope,
  an altered statement, another artifact's statement (mix-and-match), a truncated and a
  non-canonical one, a channel answer that is no object, an expired one, a substituted manifest, a substituted version
  signature, and an old statement replayed (also after the agent restarts).
* A channel statement that expires leaves the site on its version, saying "stale" (in
  /v1/site, its metrics and `fabric status`).
* Through a real relay (hub + edge) the edge verifies the publisher's envelopes, which
  its own origin withholds: the hub re-serves them untouched.
* Key rotation and revocation by root-signed delegations (GET /v1/trust): a new key's
  versions are accepted without re-publishing old ones; after revocation is known, a
  statement by the revoked key is refused, also after a restart.
"""

from __future__ import annotations

import base64
import os
import time
from pathlib import Path

import pytest

from fabric.publish import publish
from fabric.trust import DelegationsStatement, Key, Rule, TrustPolicy, VersionStatement, sign
from fabric.trust.statements import next_channel_statement
from fabric.wire.client import RemoteTarget, SyncOrigin

from helpers.agent import SITE_SECRETS, SITE_TOKENS, AgentProcess
from helpers.http import request
from helpers.lying_origin import LyingOrigin, altered, forge_channel, forge_version, substituted_manifest
from helpers.origin import (ADMIN_SECRET, DEFAULT_TOKENS, PUBLISH_SECRET, PULL_SECRET, fabric, fabric_json, start_origin,
                            write_token_file)
from helpers.wait import wait_until

pytestmark = pytest.mark.timeout(180)

A, OTHER, CH = "sig-model", "sig-other", "prod"
SYNC = {"resync_interval": 0.3}


def new_key() -> Key:
    return Key.from_seed(os.urandom(32))


class Lab:
    """An origin, a lying origin in front of it, a publisher and the keys of the story."""

    def __init__(self, root: Path):
        self.root = root
        self.origin = start_origin(root / "origin", DEFAULT_TOKENS + SITE_TOKENS)
        self.liar = LyingOrigin(self.origin.url).start()
        self.so = SyncOrigin(self.origin.url, PUBLISH_SECRET)
        self.publisher, self.outsider, self.bert, self.root_key = new_key(), new_key(), new_key(), new_key()
        self.sites: list[AgentProcess] = []

    def policy(self, name: str = "trust.toml", *, root: bool = False) -> Path:
        p = TrustPolicy()
        p.add(self.publisher.public, ["sig-*"], name="ci")
        p.add(self.bert.public, ["bert*"], name="bert-ci")  # a trusted key, for other artifacts only
        if root:
            p.add_root(self.root_key.public, name="root")
        p.save(self.root / name)
        return self.root / name

    def publish(self, version: str, *, artifact: str = A, key: Key | None = None, promote: bool = True,
                expiry: float = 3600, seed: int | None = None) -> str:
        """Publish a small version; sign it and its promotion with `key` (None: the publisher's)."""
        key = key or self.publisher
        folder = self.root / "src" / artifact / version
        folder.mkdir(parents=True)
        rng = seed if seed is not None else hash((artifact, version)) & 0xFFFF
        (folder / "weights.bin").write_bytes(os.urandom(48 << 10) + rng.to_bytes(4, "big"))
        mid = publish(folder, artifact=artifact, target=RemoteTarget(self.so), version=version).manifest_id
        self.so.put_signature(artifact, version, sign(VersionStatement(artifact, version, mid), [key]).to_bytes())
        if promote:
            self.promote(artifact, version, mid, key, expiry)
        return mid

    def promote(self, artifact: str, version: str, mid: str, key: Key, expiry: float = 3600) -> None:
        seq = self.channel(artifact).get("sequence", 0) if self.has_channel(artifact) else 0
        stmt = next_channel_statement(artifact, CH, version, mid, "promote", seq, expiry)
        self.so.promote(artifact, version, CH, statement=sign(stmt, [key]).to_json())

    def has_channel(self, artifact: str) -> bool:
        return request(self.origin.url, "GET", f"/v1/artifacts/{artifact}/channels/{CH}", token=PULL_SECRET).status == 200

    def channel(self, artifact: str = A) -> dict:
        r = request(self.origin.url, "GET", f"/v1/artifacts/{artifact}/channels/{CH}", token=PULL_SECRET)
        assert r.status == 200, r
        return r.json()

    def site(self, name: str = "solo", *, origin: str | None = None, policy: Path | None = None,
             **kw) -> AgentProcess:
        extra = {"trust": str(policy)} if policy else None
        agent = AgentProcess(self.root, name, origin or self.liar.url, follow=[f"{A}:{CH}"], sync=SYNC,
                             extra=extra, **kw)
        self.sites.append(agent)
        return agent.start()

    def close(self) -> None:
        for s in self.sites:
            s.stop()
        self.liar.stop()
        self.so.close()
        self.origin.stop()


@pytest.fixture
def lab(tmp_path):
    lab = Lab(tmp_path)
    yield lab
    lab.close()


def chan(agent: AgentProcess) -> dict:
    return next(c for c in agent.status()["channels"] if c["artifact"] == A)


def wait_trust(agent: AgentProcess, state: str, code: str | None = None, timeout: float = 15.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        c = chan(agent)
        if c["trust"] == state and (code is None or (c["trust_error"] or {}).get("code") == code):
            return c
        time.sleep(0.1)
    raise AssertionError(f"{agent.site}: wanted trust {state} {code or ''}, got {c}\n{agent.log_text()[-3000:]}")


def refusals(agent: AgentProcess, code: str) -> float:
    return agent.metrics().get(f'fabric_agent_signature_refusals_total{{code="{code}"}}', 0.0)


def fetched(agent: AgentProcess) -> float:
    return sum(v for k, v in agent.metrics().items() if k.startswith("fabric_agent_bytes_by_source_total"))


def test_every_attack_is_refused_by_code_before_any_chunk_and_the_signed_version_keeps_serving(lab):
    agent = lab.site(policy=lab.policy())
    lab.publish("v1")
    agent.wait_active(A, "v1", timeout=20)
    c = wait_trust(agent, "verified")
    assert c["trust_error"] is None and c["statement_expires"].endswith("Z")
    v1_channel = lab.channel()  # recorded, to replay later
    lab.publish("v1", artifact=OTHER)  # the same key signs another artifact: a statement to mix in
    other_channel = lab.channel(OTHER)
    evil = lab.publish("evil", promote=False, key=lab.outsider)  # the attacker's weights, in the origin's store
    evil_manifest = lab.so.manifest(A, "evil")
    v2_unpromoted = lab.publish("v2", promote=False)  # signed, not yet promoted
    bytes_before = fetched(agent)

    def refused(code: str, **lies) -> None:
        before = refusals(agent, code)
        for kind, value in lies.items():
            setattr(lab.liar, kind, value) if kind in ("strip", "strip_signatures") else \
                getattr(lab.liar, kind).update(value)
        c = wait_trust(agent, "refused", code)
        assert c["active"] == agent.active(A) == "v1", c
        deadline = time.monotonic() + 5
        while refusals(agent, code) < before + 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert refusals(agent, code) == before + 1, (code, agent.metrics())
        lab.liar.tell_the_truth()
        wait_trust(agent, "verified")

    def statement_bytes(payload: bytes) -> dict:
        env = dict(v1_channel["statement"], payload=base64.b64encode(payload).decode())
        return dict(v1_channel, statement=env)

    forged = {"version": "evil", "manifest": evil, "sequence": 2}
    refused("unsigned", strip=True)  # every statement withheld
    refused("unsigned", channels={(A, CH): {k: v for k, v in forge_channel(v1_channel, [lab.outsider], **forged).items()
                                            if k != "statement"}})
    refused("unknown_key", channels={(A, CH): forge_channel(v1_channel, [lab.outsider], **forged)})
    refused("key_out_of_scope", channels={(A, CH): forge_channel(v1_channel, [lab.bert], **forged)})
    refused("signature_invalid", channels={(A, CH): altered(v1_channel, **forged)})
    refused("statement_mismatch", channels={(A, CH): other_channel})  # sig-other's statement for sig-model
    payload = base64.b64decode(v1_channel["statement"]["payload"])
    refused("statement_malformed", channels={(A, CH): statement_bytes(payload[: len(payload) // 2])})
    refused("statement_malformed", channels={(A, CH): ["not", "a", "channel"]})
    refused("statement_not_canonical", channels={(A, CH): statement_bytes(payload.replace(b",", b", "))})
    refused("statement_expired", channels={(A, CH): forge_channel(  # genuinely signed once, expired now
        v1_channel, [lab.publisher], version="v2", manifest=v2_unpromoted, sequence=2, expires=int(time.time()) - 5)})
    assert fetched(agent) == bytes_before  # every refusal came before any chunk
    assert not (agent.data / "versions" / A / "evil").exists()

    # a genuine move to v2 (the publisher's key signed it), while the origin substitutes v2's manifest
    # (the attacker's weights under v2's name), then v2's signature
    to_v2 = {(A, CH): forge_channel(v1_channel, [lab.publisher], version="v2", manifest=v2_unpromoted, sequence=2)}
    refused("statement_mismatch", channels=to_v2, manifests={(A, "v2"): substituted_manifest(evil_manifest, version="v2")})
    refused("unknown_key", channels=to_v2, signatures={(A, "v2"): forge_version(A, "v2", v2_unpromoted, [lab.outsider])})
    assert fetched(agent) == bytes_before
    assert sorted(p.name for p in (agent.data / "versions" / A).iterdir()) == ["v1"]  # nothing partial
    assert [p.name for p in (agent.data / "current").iterdir()] == [A]

    lab.promote(A, "v2", v2_unpromoted, lab.publisher)  # the truth, at last: v2 activates
    agent.wait_active(A, "v2", timeout=20)
    assert wait_trust(agent, "verified")["active"] == "v2"

    refused_replay = {"channels": {(A, CH): v1_channel}}  # sequence 1 < 2: a rollback
    assert refusals(agent, "sequence_rollback") == 0
    lab.liar.channels.update(refused_replay["channels"])
    wait_trust(agent, "refused", "sequence_rollback")
    assert agent.active(A) == "v2"

    agent.stop()  # what was accepted survives a restart
    agent.start()
    wait_trust(agent, "refused", "sequence_rollback")
    assert agent.active(A) == "v2" and refusals(agent, "sequence_rollback") == 1
    lab.liar.tell_the_truth()
    assert wait_trust(agent, "verified")["active"] == "v2"


def test_an_expired_channel_statement_leaves_the_site_on_its_version_saying_stale(lab):
    agent = lab.site(policy=lab.policy())
    lab.publish("v1", expiry=4)
    agent.wait_active(A, "v1", timeout=20)
    c = wait_trust(agent, "verified")
    expires = agent.metrics()[f'fabric_agent_channel_statement_expiry_timestamp_seconds{{artifact="{A}",channel="{CH}"}}']
    assert abs(expires - (time.time() + 4)) < 6 and c["statement_expires"]
    stale = f'fabric_agent_channel_stale{{artifact="{A}",channel="{CH}"}}'
    assert agent.metrics()[stale] == 0
    c = wait_trust(agent, "stale", timeout=15)
    assert c["active"] == agent.active(A) == "v1" and c["trust_error"] is None
    assert agent.metrics()[stale] == 1
    assert agent.metrics()[f'fabric_agent_channel_trust{{artifact="{A}",channel="{CH}",state="stale"}}'] == 1
    def reported():  # the next report (report_interval 0.5 s) carries it
        shown = fabric_json("status", "--origin", lab.origin.url, "--token", ADMIN_SECRET)
        c = next(c for site in shown["sites"] for c in site["channels"] if site["site"] == "solo")
        return c if (c["trust"], c["active"]) == ("stale", "v1") else None
    wait_until(reported, timeout=15, interval=0.2, what="the site's report of a stale v1 at the origin")
    table = fabric("status", "--origin", lab.origin.url, "--token", ADMIN_SECRET)
    assert table.returncode == 0 and "trust" in table.stdout and "stale" in table.stdout, table.stdout
    lab.publish("v2")  # a fresh move ends it
    agent.wait_active(A, "v2", timeout=20)
    wait_trust(agent, "verified")
    assert agent.metrics()[stale] == 0


def test_an_edge_verifies_the_publishers_envelopes_through_a_relay_that_passes_them_untouched(lab):
    policy = lab.policy()
    hub_tokens = write_token_file(lab.root / "hub-tokens.toml", SITE_TOKENS)
    hub = lab.site("hub", origin=lab.origin.url, policy=policy, tokens=hub_tokens)
    lab.liar.strip_signatures = True  # the edge's origin withholds every version signature
    edge = lab.site("edge-a", policy=policy, upstreams=[hub.url])
    lab.publish("v1")
    hub.wait_active(A, "v1", timeout=20)
    edge.wait_active(A, "v1", timeout=20)
    assert wait_trust(hub, "verified")["active"] == "v1"
    assert wait_trust(edge, "verified")["active"] == "v1"
    at_origin = request(lab.origin.url, "GET", f"/v1/artifacts/{A}/versions/v1/signature", token=PULL_SECRET)
    at_hub = request(hub.url, "GET", f"/v1/artifacts/{A}/versions/v1/signature", token=SITE_SECRETS["edge-a"])
    assert at_origin.status == at_hub.status == 200 and at_hub.body == at_origin.body  # byte for byte
    assert (hub.data / "trust" / "versions" / A / "v1").read_bytes() == at_origin.body
    assert request(lab.liar.url, "GET", f"/v1/artifacts/{A}/versions/v1/signature",
                   token=PULL_SECRET).status == 404
    assert refusals(edge, "unsigned") == 0
    stmt = DelegationsStatement(1, int(time.time()) + 3600, {}, (), ())
    with SyncOrigin(lab.origin.url, ADMIN_SECRET) as admin:
        admin.put_trust(sign(stmt, [lab.root_key]).to_bytes())
    trust_at = [request(u, "GET", "/v1/trust", token=SITE_SECRETS["edge-a"]) for u in (lab.origin.url, hub.url)]
    assert trust_at[0].status == trust_at[1].status == 200 and trust_at[1].body == trust_at[0].body  # passed through


def test_rotation_and_revocation_by_root_signed_delegations(lab):
    agent = lab.site(policy=lab.policy(root=True))
    admin = SyncOrigin(lab.origin.url, ADMIN_SECRET)
    try:
        lab.publish("v1")
        agent.wait_active(A, "v1", timeout=20)
        rotated = new_key()
        lab.publish("v2", key=rotated)  # not trusted yet
        wait_trust(agent, "refused", "unknown_key")

        def delegations(version: int, revoked=()) -> bytes:
            stmt = DelegationsStatement(version, int(time.time()) + 3600, {rotated.keyid: rotated.public},
                                        (Rule(("sig-*",), ("*",), (rotated.keyid,), 1),), tuple(revoked))
            return sign(stmt, [lab.root_key]).to_bytes()

        admin.put_trust(delegations(1))  # the root adds the new key: v2 goes live, nothing re-published
        agent.wait_active(A, "v2", timeout=20)
        assert wait_trust(agent, "verified")["active"] == "v2"
        assert agent.status()["trust"]["delegations"] == 1

        admin.put_trust(delegations(2, revoked=[lab.publisher.keyid]))  # the old key is revoked
        deadline = time.monotonic() + 10
        while agent.status()["trust"]["delegations"] != 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert agent.status()["trust"]["delegations"] == 2
        lab.publish("v3")  # signed by the revoked key
        wait_trust(agent, "refused", "key_revoked")
        assert agent.active(A) == "v2" and refusals(agent, "key_revoked") == 1

        agent.stop()  # the delegations kept in the data folder hold after a restart,
        lab.liar.strip_trust = True  # with the origin withholding them
        agent.start()
        wait_trust(agent, "refused", "key_revoked")
        assert agent.active(A) == "v2"
    finally:
        admin.close()
