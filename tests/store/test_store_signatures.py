"""fabric.store.signatures on every backend (a local folder and a real SeaweedFS bucket): version
envelopes under `sigs/`, merged by compare-and-swap, kept by gc while their version lives and
deleted with it, checked by fsck; channel statements written with the move; delegations
that only go up.
"""

from __future__ import annotations

import pytest

from fabric.core import digest
from fabric.core.manifest import FileEntry, Manifest
from fabric.errors import Conflict, StatementMismatch
from fabric.fsck import fsck
from fabric.gc import gc
from fabric.store import signatures
from fabric.store.registry import Registry, now_rfc3339
from fabric.trust import ChannelStatement, DelegationsStatement, Key, VersionStatement, sign

K1, K2 = Key.from_seed(b"a" * 32), Key.from_seed(b"b" * 32)
T = 1_800_000_000


def commit(reg: Registry, version: str) -> str:
    data = f"weights of {version} ".encode() * 100
    cid = digest.digest(data)
    reg.store.put_chunk(cid, data)
    return reg.commit(Manifest(artifact="m", version=version, created=now_rfc3339(),
                               files=(FileEntry("w.bin", len(data), 0o644, ((cid, len(data)),)),)))


def venv(version: str, mid: str, key: Key = K1, at: int = T) -> bytes:
    return sign(VersionStatement("m", version, mid, at), [key]).to_bytes()


def cenv(version: str, mid: str, action: str, seq: int) -> dict:
    return sign(ChannelStatement("m", "prod", version, mid, action, seq, T + 60, T), [K1]).to_json()


@pytest.fixture
def reg(make_store) -> Registry:
    return Registry(make_store())


def test_version_envelopes_merge_by_keyid_and_refuse_another_payload(reg):
    mid = commit(reg, "v1")
    assert reg.signature("m", "v1") is None
    assert reg.put_signature("m", "v1", venv("v1", mid)) == venv("v1", mid)
    merged = reg.put_signature("m", "v1", venv("v1", mid, K2))
    assert reg.signature("m", "v1") == merged
    assert sorted(s.keyid for s in signatures.Envelope.from_bytes(merged).signatures) == sorted([K1.keyid, K2.keyid])
    assert reg.put_signature("m", "v1", venv("v1", mid, K2)) == merged  # again: no change
    with pytest.raises(Conflict):
        reg.put_signature("m", "v1", venv("v1", mid, K2, at=T + 1))
    with pytest.raises(StatementMismatch):
        reg.put_signature("m", "v1", venv("v1", "blake3:" + "0" * 64))
    assert reg.store.backend.get("sigs/m/versions/v1") == merged


def test_gc_keeps_a_live_versions_envelope_and_deletes_it_with_the_version(reg):
    mids = {v: commit(reg, v) for v in ("v1", "v2", "v3")}
    for v, mid in mids.items():
        reg.put_signature("m", v, venv(v, mid))
    report = gc(reg.store, keep=1, grace=0)
    assert sorted(report.versions_deleted) == ["m@v1", "m@v2"]
    assert reg.signature("m", "v3") == venv("v3", mids["v3"])
    assert [(a, v) for a, v, _ in signatures.iter_signatures(reg.store)] == [("m", "v3")]
    # an envelope left behind by a crash between the two deletes goes in the sweep
    reg.store.backend.put(signatures.signature_key("m", "v1"), venv("v1", mids["v1"]))
    assert gc(reg.store, keep=1, grace=0).signatures_deleted == 1
    assert signatures.get_signature(reg.store, "m", "v1") is None
    assert reg.signature("m", "v3") is not None


def test_fsck_reports_an_envelope_that_does_not_parse_or_names_another_manifest(reg):
    m1, m2 = commit(reg, "v1"), commit(reg, "v2")
    reg.put_signature("m", "v1", venv("v1", m1))
    assert fsck(reg.store).ok and fsck(reg.store).signatures == 1
    reg.store.backend.put(signatures.signature_key("m", "v2"), venv("v2", m1))  # the wrong manifest
    reg.store.backend.put(signatures.signature_key("m", "v1"), venv("v1", m1)[:-5])  # truncated
    report = fsck(reg.store)
    assert not report.ok
    assert sorted(b.split(":")[0] for b in report.bad_signatures) == ["m@v1", "m@v2"]
    assert any("statement_mismatch" in b for b in report.bad_signatures)
    fsck(reg.store, repair=True)
    assert fsck(reg.store).ok and signatures.get_signature(reg.store, "m", "v2") is None
    assert m2


def test_a_channel_statement_is_written_with_its_move_and_sequences_go_up(reg):
    m1, m2 = commit(reg, "v1"), commit(reg, "v2")
    reg.promote("m", "v1", "prod", statement=cenv("v1", m1, "promote", 1))
    reg.promote("m", "v2", "prod", statement=cenv("v2", m2, "promote", 2))
    with pytest.raises(StatementMismatch):  # a rollback leaves v1 on top, not v2
        reg.rollback("m", "prod", statement=cenv("v2", m2, "rollback", 3))
    with pytest.raises(Conflict):  # a replayed sequence
        reg.rollback("m", "prod", statement=cenv("v1", m1, "rollback", 2))
    ch = reg.rollback("m", "prod", statement=cenv("v1", m1, "rollback", 3))
    again = reg.channel("m", "prod")
    assert (again.version, again.sequence, again.statement) == ("v1", 3, cenv("v1", m1, "rollback", 3)) == (
        ch.version, ch.sequence, ch.statement)
    assert again.statement_bytes == signatures.envelope_bytes(cenv("v1", m1, "rollback", 3))


def test_delegations_are_replaced_only_by_a_higher_version(reg):
    def deleg(v: int) -> bytes:
        return sign(DelegationsStatement(v, T + 60, {K2.keyid: K2.public}, (), ()), [K1]).to_bytes()
    assert reg.trust() is None
    assert reg.put_trust(deleg(2)) == 2
    with pytest.raises(Conflict):
        reg.put_trust(deleg(2))
    assert reg.put_trust(deleg(5)) == 5 and reg.trust() == deleg(5)
