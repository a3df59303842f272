"""Who may do what at a real `fabric agent` (issue 13, authorization): the worker routes
check the artifact and bind a worker id to the token that registered it; the site's
status is for admins and the site's own token; the relay shows a child only the chunks
its token may pull.

One origin and one agent (`solo`, following `llama-7b:prod`, with a token file) serve
the module; `secret-model` is published too, but the agent does not follow it.
"""

from __future__ import annotations

import asyncio

import pytest

from fabric.publish import publish
from fabric.wire import frames as wire
from fabric.wire.client import RemoteTarget, SyncOrigin
from fabric.wire.protocol import WORKERS

from helpers.agent import SITE_SECRETS, SITE_TOKENS, AgentProcess
from helpers.files import write_tree
from helpers.http import request
from helpers.origin import DEFAULT_TOKENS, PUBLISH_SECRET, start_origin, write_token_file

pytestmark = pytest.mark.timeout(120)

A, B = "worker-a-secret-6e2c8d0f4b", "worker-b-secret-1f7a3c9e5d"  # both pull llama-*
OTHER = "other-puller-secret-8b4d2f6a0c"  # pull on other-* only
AGENT_TOKENS = SITE_TOKENS + [
    {"name": "worker-a", "secret": A, "scopes": ["pull"], "artifacts": ["llama-*"]},
    {"name": "worker-b", "secret": B, "scopes": ["pull"], "artifacts": ["llama-*"]},
    {"name": "other", "secret": OTHER, "scopes": ["pull"], "artifacts": ["other-*"]},
]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("agent-authz")
    origin = start_origin(root / "origin", DEFAULT_TOKENS + SITE_TOKENS)
    with SyncOrigin(origin.url, PUBLISH_SECRET) as so:
        for artifact in ("llama-7b", "secret-model"):
            publish(write_tree(root / artifact, {"w.bin": artifact.encode() * 2000}), artifact=artifact,
                    target=RemoteTarget(so), version="v1", channel="prod")
    tokens = write_token_file(root / "agent-tokens.toml", AGENT_TOKENS)
    agent = AgentProcess(root, "solo", origin.url, follow=["llama-7b:prod"], tokens=tokens).start()
    agent.wait_active("llama-7b", "v1")
    yield origin, agent
    agent.stop()
    origin.stop()


def register(agent, wid: str, token: str, artifact: str = "llama-7b"):
    return request(agent.url, "POST", WORKERS, {"worker": wid, "artifact": artifact}, token=token)


def test_a_token_registers_workers_only_for_artifacts_it_may_pull(site):
    _, agent = site
    r = register(agent, "intruder", OTHER)
    assert r.status == 403 and r.error()["code"] == "forbidden"
    assert register(agent, "a-1", A).status == 200


def test_a_worker_id_belongs_to_the_token_that_registered_it(site):
    _, agent = site
    assert register(agent, "a-2", A).status == 200
    for method, path, body in [("GET", f"{WORKERS}/a-2/assignment?after=0&wait=0.2", None),
                               ("POST", f"{WORKERS}/a-2/report", {"seq": 1, "ok": False, "error": "x"}),
                               ("DELETE", f"{WORKERS}/a-2", None)]:
        r = request(agent.url, method, path, body, token=B)
        assert r.status == 403 and r.error()["code"] == "forbidden", (method, path, r)
    assert register(agent, "a-2", B).status == 403  # nor take the id over
    assert request(agent.url, "GET", f"{WORKERS}/a-2/assignment?after=0&wait=0.2", token=A).status == 200
    listed = request(agent.url, "GET", WORKERS, token=A).json()["workers"]
    assert "a-2" in [w["worker"] for w in listed]
    assert request(agent.url, "GET", WORKERS, token=OTHER).json() == {"workers": [], "rollouts": []}
    assert request(agent.url, "DELETE", f"{WORKERS}/a-2", token=A).status == 200


def test_the_sites_status_is_for_its_own_token_only(site):
    _, agent = site
    r = request(agent.url, "GET", "/v1/site", token=A)
    assert r.status == 403 and r.error()["code"] == "forbidden"
    st = request(agent.url, "GET", "/v1/site", token=SITE_SECRETS["solo"]).json()
    assert [c["artifact"] for c in st["channels"]] == ["llama-7b"]


def _kinds(agent, ids, token) -> set[int]:
    r = request(agent.url, "POST", "/v1/chunks/fetch", {"ids": ids}, token=token)
    assert r.status == 200, r

    async def parse():
        return [f async for f in wire.FrameReader(wire.bytes_reader(r.body))]
    return {f.kind for f in asyncio.run(parse())}


def test_the_relay_shows_a_child_only_chunks_of_artifacts_it_may_pull(site):
    origin, agent = site

    def ids(artifact):
        m = request(origin.url, "GET", f"/v1/artifacts/{artifact}/versions/v1", token=PUBLISH_SECRET).json()
        return [cid for f in m["files"] for cid, _ in f["chunks"]]
    llama, secret = ids("llama-7b"), ids("secret-model")
    assert _kinds(agent, llama, A) == {wire.FRAME_CHUNK}
    assert _kinds(agent, llama, OTHER) == {wire.FRAME_MISSING}
    assert _kinds(agent, secret, A) == {wire.FRAME_MISSING}  # no pull-through for it either
    # the site's own token may pull every artifact: the relay vouches for secret-model's chunks from
    # the origin's versions, before it holds them, and pulls them through
    assert _kinds(agent, secret, SITE_SECRETS["solo"]) == {wire.FRAME_CHUNK}
