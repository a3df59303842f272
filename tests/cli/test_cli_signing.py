"""Signed versions through the `fabric` CLI against a real origin process: `publish/promote/rollback
--sign-key`, `fabric sign` (k of n), `fabric verify`, `fabric pull --trust` (refusing before any
chunk is fetched) and `fabric trust publish` (delegations a site's trust file takes in).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fabric.trust import TrustPolicy, VersionStatement, sign

from helpers.files import random_bytes, write_tree
from helpers.origin import ADMIN_SECRET, PUBLISH_SECRET, PULL_SECRET, fabric, start_origin
from helpers.trust import key_files

ART = "sig-model"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-signing")
    origin = start_origin(root / "origin")
    keys = {name: key_files(root / "keys", name) for name in ("ci", "co", "stranger", "root")}
    yield origin, root, keys
    origin.stop()


def trust_file(path: Path, *rules, root=None) -> Path:
    """A trust file with one rule per (artifacts glob, [keys], threshold)."""
    p = TrustPolicy()
    for artifacts, ks, threshold in rules:
        for k in ks:
            p.add(k.public, [artifacts])
        if threshold > 1:
            p.add(ks[0].public, [artifacts], threshold=threshold)
    if root is not None:
        p.add_root(root.public)
    p.save(path)
    return path


def run(origin, *args, token=PUBLISH_SECRET, rc=0, as_json=True):
    p = fabric(*args, "--origin", origin.url, "--token", token, *(["--json"] if as_json else []), timeout=120)
    assert p.returncode == rc, f"fabric {args}: rc={p.returncode}\nstdout={p.stdout}\nstderr={p.stderr}"
    return (json.loads(p.stdout) if as_json and p.stdout.strip() else None), p


def publish(origin, root: Path, version: str, key: Path | None, channel: str | None = "prod", seed: int = 0):
    import numpy as np
    src = write_tree(root / "src" / version, {"w.bin": random_bytes(np.random.default_rng(seed), 120_000)})
    args = ["publish", src, "-a", ART, "--version", version] + (["--channel", channel] if channel else [])
    return run(origin, *args, *(["--sign-key", key] if key else []))[0]


def chunk_files(store: Path) -> list[Path]:
    return [p for p in (store / "chunks").rglob("*") if p.is_file()] if (store / "chunks").exists() else []


def test_publish_signed_then_verify_accepts_and_a_wrong_trust_file_refuses(world):
    origin, root, keys = world
    ci, ci_key, _ = keys["ci"]
    stranger = keys["stranger"][0]
    report = publish(origin, root, "v1", ci_key, seed=1)
    assert report["signed_by"] == [ci.keyid]
    good = trust_file(root / "good.toml", ("sig-*", [ci], 1))
    got, _ = run(origin, "verify", f"{ART}:prod", "--trust", good, token=PULL_SECRET)
    assert got["state"] == "verified" and got["version"] == "v1" and got["keyids"] == [ci.keyid]
    assert got["manifest_id"] == report["manifest_id"]
    assert got["channel"]["sequence"] == 1 and got["channel"]["keyids"] == [ci.keyid]
    _, p = run(origin, "verify", f"{ART}@v1", "--trust", good, token=PULL_SECRET, as_json=False)
    assert "verified" in p.stdout and ci.keyid[:16] in p.stdout and "rule 0" in p.stdout
    cases = [(trust_file(root / "stranger.toml", ("sig-*", [stranger], 1)), "unknown_key"),
             (trust_file(root / "scoped.toml", ("bert*", [ci], 1)), "key_out_of_scope")]
    for path, code in cases:
        got, _ = run(origin, "verify", f"{ART}@v1", "--trust", path, token=PULL_SECRET, rc=6)
        assert got["error"]["code"] == code


def test_pull_trust_refuses_a_replaced_signature_before_fetching_any_chunk(world, tmp_path):
    origin, root, keys = world
    ci, ci_key, _ = keys["ci"]
    stranger = keys["stranger"][0]
    publish(origin, root, "v2", ci_key, channel=None, seed=2)
    good = trust_file(root / "good-pull.toml", ("sig-*", [ci], 1))
    sig = origin.store / "sigs" / ART / "versions" / "v2"
    genuine = sig.read_bytes()
    mid = json.loads(run(origin, "show", f"{ART}@v2")[1].stdout)["manifest_id"]
    v1_sig = (origin.store / "sigs" / ART / "versions" / "v1").read_bytes()
    forgeries = [(sign(VersionStatement(ART, "v2", mid), [stranger]).to_bytes(), "unknown_key"),
                 (v1_sig, "statement_mismatch")]  # a genuine signature, for another version
    for i, (forged, code) in enumerate(forgeries):
        sig.write_bytes(forged)  # the attacker controls the origin's store
        dest, store = tmp_path / f"dest{i}", tmp_path / f"store{i}"
        got, _ = run(origin, "pull", f"{ART}@v2", dest, "--store", store, "--trust", good,
                     token=PULL_SECRET, rc=6)
        assert got["error"]["code"] == code
        assert not dest.exists() and chunk_files(store) == []  # refused before any chunk moved
    sig.write_bytes(genuine)
    got, p = run(origin, "pull", f"{ART}@v2", tmp_path / "ok", "--store", tmp_path / "st", "--trust", good,
                 token=PULL_SECRET)
    assert got["trust"]["state"] == "verified" and (tmp_path / "ok" / "w.bin").stat().st_size == 120_000
    assert "unsigned" not in p.stderr
    _, p = run(origin, "pull", f"{ART}@v2", tmp_path / "plain", "--store", tmp_path / "st2", token=PULL_SECRET)
    assert "unsigned: no trust policy" in p.stderr  # without --trust: loud, but it pulls


def test_promote_and_rollback_sign_with_increasing_sequences(world, tmp_path):
    origin, root, keys = world
    ci, ci_key, _ = keys["ci"]
    good = trust_file(root / "good-seq.toml", ("sig-*", [ci], 1))
    for v, seed in (("s1", 11), ("s2", 12), ("s3", 13)):
        publish(origin, root, v, ci_key, channel="seq", seed=seed)
    ch, _ = run(origin, "rollback", ART, "-c", "seq", "--steps", "2", "--sign-key", ci_key)
    assert (ch["version"], ch["sequence"]) == ("s1", 4)
    ch, _ = run(origin, "promote", f"{ART}@s3", "-c", "seq", "--sign-key", ci_key, "--statement-expiry", "2h")
    assert (ch["version"], ch["sequence"]) == ("s3", 5)
    ref = origin.store / "refs" / ART / "channels" / "seq"
    older = ref.read_bytes()  # a genuine, unexpired move: what a lying origin would replay
    ch, _ = run(origin, "rollback", ART, "-c", "seq", "--to", "s1", "--sign-key", ci_key)
    assert (ch["version"], ch["sequence"]) == ("s1", 6)
    got, _ = run(origin, "verify", f"{ART}:seq", "--trust", good, token=PULL_SECRET)
    assert (got["version"], got["channel"]["sequence"], got["channel"]["action"]) == ("s1", 6, "rollback")
    dest = tmp_path / "seq"
    got, _ = run(origin, "pull", f"{ART}:seq", dest, "--store", tmp_path / "st", "--trust", good, token=PULL_SECRET)
    assert got["version"] == "s1" and got["trust"]["channel"]["sequence"] == 6
    newer = ref.read_bytes()
    ref.write_bytes(older)  # the origin serves the older move again: the puller's store remembers 6
    got, _ = run(origin, "pull", f"{ART}:seq", tmp_path / "replayed", "--store", tmp_path / "st", "--trust", good,
                 token=PULL_SECRET, rc=6)
    assert got["error"]["code"] == "sequence_rollback" and not (tmp_path / "replayed").exists()
    ref.write_bytes(newer)
    # an unsigned move leaves the channel unsigned: refused under a trust policy
    run(origin, "promote", f"{ART}@s3", "-c", "seq")
    got, _ = run(origin, "verify", f"{ART}:seq", "--trust", good, token=PULL_SECRET, rc=6)
    assert got["error"]["code"] == "unsigned"


def test_k_of_n_needs_the_cosignature_fabric_sign_adds(world):
    origin, root, keys = world
    (ci, ci_key, _), (co, co_key, _) = keys["ci"], keys["co"]
    two = trust_file(root / "two.toml", ("sig-*", [ci, co], 2))
    publish(origin, root, "k1", ci_key, channel=None, seed=21)
    got, _ = run(origin, "verify", f"{ART}@k1", "--trust", two, token=PULL_SECRET, rc=6)
    assert got["error"]["code"] == "threshold_not_met"
    got, _ = run(origin, "sign", f"{ART}@k1", "--sign-key", co_key)
    assert sorted(got["keyids"]) == sorted([ci.keyid, co.keyid])
    got, _ = run(origin, "verify", f"{ART}@k1", "--trust", two, token=PULL_SECRET)
    assert sorted(got["keyids"]) == sorted([ci.keyid, co.keyid])


def test_trust_publish_delegates_keys_a_site_file_takes_in_and_revokes_them(world, tmp_path):
    origin, root, keys = world
    (ci, ci_key, _), (rootk, root_key, _) = keys["ci"], keys["root"]
    site = trust_file(root / "site.toml", root=rootk)  # only a root key: no rule of its own
    publisher = trust_file(root / "publisher.toml", ("sig-*", [ci], 1), root=rootk)
    publish(origin, root, "d1", ci_key, channel=None, seed=31)
    got, _ = run(origin, "pull", f"{ART}@d1", tmp_path / "a", "--store", tmp_path / "s", "--trust", site,
                 token=PULL_SECRET, rc=6)
    assert got["error"]["code"] == "unknown_key"
    run(origin, "trust", "publish", publisher, "--root-key", root_key, token=PUBLISH_SECRET, rc=4)
    got, _ = run(origin, "trust", "publish", publisher, "--root-key", root_key, token=ADMIN_SECRET)
    first = got["version"]
    assert got["keys"] == [ci.keyid] and got["rules"] == 1
    got, _ = run(origin, "pull", f"{ART}@d1", tmp_path / "b", "--store", tmp_path / "s", "--trust", site,
                 token=PULL_SECRET)
    assert got["trust"]["delegations"] == first and got["trust"]["keyids"] == [ci.keyid]
    pol = TrustPolicy.load(publisher)
    pol.revoke(ci.keyid)
    pol.save(publisher)
    got, _ = run(origin, "trust", "publish", publisher, "--root-key", root_key, token=ADMIN_SECRET)
    assert got["version"] == first + 1 and got["revoked"] == [ci.keyid]
    got, _ = run(origin, "verify", f"{ART}@d1", "--trust", site, token=PULL_SECRET, rc=6)
    assert got["error"]["code"] == "key_revoked"
