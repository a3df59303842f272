"""A relay still fetching a new version sends its children deltas: a real origin and real agents.

Named after what it proves. At a promote every site asks for the new version at once, so
a hub's children ask it for chunks while it is still fetching them from the origin, before
the version is in its registry. The hub plans those requests from the manifest it is
pulling (`agents.site.relay.Relay.pending`), so a child holding the previous version gets
each changed chunk as the delta frame the origin sent the hub (`Forwarded`), instead of
the chunk's stored form, and the hub encodes nothing for it. The hub's fetch is slowed
(`max_rate`) so the child's requests land while it fetches; the origin and the hub pick
encodings as on a WAN link (`FABRIC_ENCODE=full`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from fabric.publish import publish
from fabric.wire.client import RemoteTarget, SyncOrigin

from helpers.agent import SITE_TOKENS, AgentProcess
from helpers.origin import DEFAULT_TOKENS, PUBLISH_SECRET, OriginProcess, tree_digest, write_token_file

pytestmark = pytest.mark.timeout(180)
TENSORS, ELEMENTS = 8, 1 << 18  # 1 MiB float32 tensors
CHANGED = (1, 4, 6)  # the tensors a fine-tune step moves


def make_model(folder: Path, step: bool) -> Path:
    """v1: noise weights; the step: the same, with the CHANGED tensors nudged (a relative 1e-4)."""
    folder.mkdir(parents=True, exist_ok=True)
    weights = {}
    for i in range(TENSORS):
        w = np.random.default_rng(i).standard_normal(ELEMENTS).astype(np.float32)
        if step and i in CHANGED:
            w = w * (1 + 1e-4 * np.random.default_rng(100 + i).standard_normal(ELEMENTS).astype(np.float32))
        weights[f"layer{i}.weight"] = w
    save_file(weights, str(folder / "model.safetensors"))
    return folder


def publish_to(origin_url: str, src: Path, version: str):
    with SyncOrigin(origin_url, PUBLISH_SECRET) as so:
        return publish(src, artifact="m", target=RemoteTarget(so), version=version, channel="prod")


def test_children_asking_a_hub_still_fetching_the_version_get_deltas_not_stored_chunks(tmp_path):
    tokens = write_token_file(tmp_path / "tokens.toml", DEFAULT_TOKENS + SITE_TOKENS)
    origin = OriginProcess(tmp_path / "origin-store", tokens, tmp_path / "origin.log")
    origin.env = {"FABRIC_ENCODE": "full"}
    origin.start()
    hub = edge = None
    try:
        publish_to(origin.url, make_model(tmp_path / "v1", step=False), "v1")
        hub = AgentProcess(tmp_path, "hub", origin.url, follow=["m:prod"], tokens=tokens,
                           sync={"max_rate": "1M"})  # the hub's own fetch: about 2 s for the step's deltas
        hub.env = {"FABRIC_ENCODE": "full"}
        hub.start()
        edge = AgentProcess(tmp_path, "edge-a", origin.url, follow=["m:prod"], tokens=tokens,
                            upstreams=[hub.url]).start()
        hub.wait_active("m", "v1")
        edge.wait_active("m", "v1", timeout=60)
        m1 = edge.metrics()
        hub_key = f'fabric_agent_bytes_by_source_total{{source="{hub.url}"}}'
        origin_key = f'fabric_agent_bytes_by_source_total{{source="{origin.url}"}}'

        r2 = publish_to(origin.url, make_model(tmp_path / "v2", step=True), "v2")
        edge.wait_active("m", "v2", timeout=90)
        hub.wait_active("m", "v2", timeout=30)

        assert tree_digest(edge.data / "current" / "m") == tree_digest(tmp_path / "v2")
        em, hm = edge.metrics(), hub.metrics()
        from_hub = em.get(hub_key, 0) - m1.get(hub_key, 0)
        print(f"v2: {r2.new_bytes} new bytes; the edge got {from_hub:.0f} from the hub; "
              f"the hub's answers: {({k: v for k, v in hm.items() if k.startswith('fabric_fetch_responses')})}")
        assert r2.new_bytes >= len(CHANGED) * ELEMENTS * 4  # the changed tensors are new chunks
        assert 0 < from_hub < 0.8 * r2.new_bytes  # deltas (stored forms of this noise: all of the new bytes)
        # the hub sent the origin's own delta frames on; it encoded nothing for the child
        assert hm.get("fabric_forwarded_frames_total", 0) >= len(CHANGED)
        assert hm.get('fabric_fetch_responses_total{path="encoded"}', 0) == 0
        assert em.get(f'fabric_agent_bad_chunks_total{{source="{hub.url}"}}', 0) == 0
        assert em.get(origin_key, 0) == m1.get(origin_key, 0)  # none fetched around the hub
    finally:
        for agent in (edge, hub):
            if agent is not None:
                agent.stop()
        origin.stop()
