"""The push hook signs (hook.toml `sign_key`): real SeaweedFS, `fabric hook`, `fabric origin`
and `fabric agent` processes.

* Checkpoints written to a bucket are published by the hook with a version statement and
  a signed channel move, and a site whose trust policy trusts the hook's key for those
  artifacts verifies and activates them.
* The same hook publishing into an artifact its key is not trusted for (the site trusts
  the CI's key there): the site refuses it (`key_out_of_scope` in /v1/site and its
  metric) and keeps serving the CI's version.
* A `sign_key` the hook cannot use stops it at start-up, naming the key.
"""

from __future__ import annotations

import os
import time
import uuid

import pytest

from fabric.errors import KeyFileInvalid
from fabric.hook.config import HookConfig
from fabric.publish import publish
from fabric.signing import Signer, SigningTarget
from fabric.trust import Envelope, TrustPolicy
from fabric.wire.client import RemoteTarget, SyncOrigin

from helpers.agent import SITE_TOKENS, AgentProcess
from helpers.http import request
from helpers.origin import DEFAULT_TOKENS, PUBLISH_SECRET, PULL_SECRET, free_port, start_origin
from helpers.s3 import HookProcess, hook_config
from helpers.wait import wait_until
from helpers.trust import key_files

pytestmark = pytest.mark.timeout(150)


def channel(agent: AgentProcess, artifact: str) -> dict:
    return next(c for c in agent.status()["channels"] if c["artifact"] == artifact)


def test_hook_signed_checkpoints_activate_where_the_hook_key_is_trusted_and_are_refused_out_of_its_scope(
        tmp_path, suite_weed):
    hook_key, hook_key_file, hook_pub = key_files(tmp_path / "keys", "hook")
    ci_key, _, ci_pub = key_files(tmp_path / "keys", "ci")
    trust = TrustPolicy()
    trust.add(hook_key.public, ["llama*"], name="hook")  # the hook's rules publish llama-* checkpoints
    trust.add(ci_key.public, ["prod-*"], name="ci")
    trust.save(tmp_path / "trust.toml")

    origin = start_origin(tmp_path / "origin", DEFAULT_TOKENS + SITE_TOKENS)
    agent = hook = None
    try:
        with SyncOrigin(origin.url, PUBLISH_SECRET) as so:  # the CI's signed version of prod-model
            (tmp_path / "ci").mkdir()
            (tmp_path / "ci" / "weights.bin").write_bytes(os.urandom(200_000))
            publish(tmp_path / "ci", artifact="prod-model", version="v1", channel="latest",
                    target=SigningTarget(RemoteTarget(so), Signer([ci_key])))
        agent = AgentProcess(tmp_path, "solo", origin.url, follow=["llama-7b:latest", "prod-model:latest"],
                             sync={"resync_interval": 0.3}, extra={"trust": str(tmp_path / "trust.toml")}).start()
        agent.wait_active("prod-model", "v1", timeout=30)

        bucket = f"quiet-{uuid.uuid4().hex[:8]}"  # no filer events: the hook's listing finds the checkpoints
        s3 = suite_weed.client()
        s3.create_bucket(Bucket=bucket)
        for run, step in (("llama-7b", 100), ("prod-model", 200)):
            s3.put_object(Bucket=bucket, Key=f"runs/{run}/step-{step}/__0_0.distcp", Body=os.urandom(300_000))
            s3.put_object(Bucket=bucket, Key=f"runs/{run}/step-{step}/.metadata", Body=b"dcp metadata")
        port = free_port()
        cfg = hook_config(tmp_path, port=port, bucket=bucket, endpoint=suite_weed.endpoint, rescan="300ms",
                          origin=(origin.url, PUBLISH_SECRET), extra=f'sign_key = "{hook_key_file}"')
        hook = HookProcess(cfg, port).start()

        agent.wait_active("llama-7b", "step-100", timeout=40)
        wait_until(lambda: channel(agent, "llama-7b")["trust"] == "verified", 15, what="llama-7b verified")
        sig = request(origin.url, "GET", "/v1/artifacts/llama-7b/versions/step-100/signature", token=PULL_SECRET)
        assert sig.status == 200 and Envelope.from_bytes(sig.body).keyids == [hook_key.keyid]
        ch = request(origin.url, "GET", "/v1/artifacts/llama-7b/channels/latest", token=PULL_SECRET).json()
        assert ch["sequence"] == 1 and Envelope.from_json(ch["statement"]).keyids == [hook_key.keyid]

        # the hook also moved prod-model:latest to its step-200, signed by its key: out of its scope here
        def refused():
            c = channel(agent, "prod-model")
            return c["trust"] == "refused" and (c["trust_error"] or {}).get("code") == "key_out_of_scope" and c
        c = wait_until(refused, 30, what="prod-model refused")
        moved = request(origin.url, "GET", "/v1/artifacts/prod-model/channels/latest", token=PULL_SECRET).json()
        assert moved["version"] == "step-200" and moved["sequence"] == 2  # the origin took it; the site did not
        time.sleep(1.0)  # a few more resyncs: still refused, still on the CI's version
        assert c["active"] == agent.active("prod-model") == "v1"
        assert channel(agent, "prod-model")["trust_error"]["code"] == "key_out_of_scope"
        assert agent.metrics()['fabric_agent_signature_refusals_total{code="key_out_of_scope"}'] >= 1
        assert not (agent.data / "versions" / "prod-model" / "step-200").exists()
        assert "signed_by" in hook.log_text()
    finally:
        for p in (hook, agent):
            if p is not None:
                p.stop()
        origin.stop()


def test_a_sign_key_the_hook_cannot_use_stops_it_at_start_up_naming_the_key(tmp_path):
    _, key_file, pub_file = key_files(tmp_path, "hook")
    cfg = hook_config(tmp_path, port=free_port(), bucket="b", endpoint="http://127.0.0.1:1",
                      extra=f'sign_key = "{key_file.name}"\nstatement_expiry = "12h"')
    loaded = HookConfig.load(cfg)  # relative to hook.toml's folder
    assert loaded.sign_key == key_file and loaded.statement_expiry == 12 * 3600
    assert loaded.signer().expiry == 12 * 3600
    key_file.chmod(0o644)
    with pytest.raises(KeyFileInvalid, match=r"hook.toml: sign_key: .*chmod 600"):
        HookConfig.load(cfg)
    cfg.write_text(cfg.read_text().replace(key_file.name, pub_file.name))
    with pytest.raises(KeyFileInvalid, match="sign_key"):
        HookConfig.load(cfg)
    cfg.write_text(cfg.read_text().replace(pub_file.name, "missing.key"))
    with pytest.raises(KeyFileInvalid, match="sign_key: cannot read"):
        HookConfig.load(cfg)
    assert HookConfig.from_dict({**_minimal(), "sign_key": "missing.key"}).sign_key.name == "missing.key"  # checked by load


def _minimal() -> dict:
    return {"listen": "127.0.0.1:7100", "token": "a-long-random-secret", "store": "store",
            "rule": [{"bucket": "b", "prefix": "r/{v}/", "artifact": "a", "version": "{v}", "complete": "dcp"}]}


def test_the_hook_process_refuses_to_start_with_a_readable_key(tmp_path):
    from helpers.origin import fabric
    _, key_file, _ = key_files(tmp_path, "hook")
    key_file.chmod(0o640)
    cfg = hook_config(tmp_path, port=free_port(), bucket="b", endpoint="http://127.0.0.1:1",
                      extra=f'sign_key = "{key_file}"')
    p = fabric("hook", "--config", cfg, timeout=60)
    assert p.returncode == 2 and "key_file_invalid" in p.stderr and "sign_key" in p.stderr, p.stderr
