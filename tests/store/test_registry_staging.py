"""A channel's staged version in the registry (docs/formats.md `refs/<artifact>/channels/<channel>`,
docs/protocol.md "Staged versions"): set and cleared without moving the channel or touching
its signed statement, cleared by the move that makes it current, kept by others and by gc."""

from __future__ import annotations

import pytest

from fabric.core import digest
from fabric.core.manifest import FileEntry, Manifest
from fabric.errors import ChannelNotFound, InvalidInput, VersionNotFound
from fabric.gc import gc
from fabric.store.registry import Registry, now_rfc3339
from fabric.store.store import open_store
from fabric.trust import ChannelStatement, Key, sign

K = Key.from_seed(b"s" * 32)
T = 1_800_000_000


@pytest.fixture
def reg(tmp_path) -> Registry:
    return Registry(open_store(tmp_path / "store"))


def commit(reg: Registry, version: str) -> str:
    data = f"weights of {version} ".encode() * 100
    cid = digest.digest(data)
    reg.store.put_chunk(cid, data)
    return reg.commit(Manifest(artifact="m", version=version, created=now_rfc3339(),
                               files=(FileEntry("w.bin", len(data), 0o644, ((cid, len(data)),)),)))


def test_a_stage_changes_neither_version_history_statement_nor_sequence(reg):
    m1 = commit(reg, "v1")
    commit(reg, "v2")
    statement = sign(ChannelStatement("m", "prod", "v1", m1, "promote", 1, T + 60, T), [K]).to_json()
    before = reg.promote("m", "v1", "prod", statement=statement)
    ch = reg.stage("m", "v2", "prod")
    assert (ch.version, ch.history, ch.statement, ch.sequence) == ("v1", before.history, statement, 1)
    assert ch.staged_version == "v2" and reg.channel("m", "prod").staged == ch.staged  # in the ref
    with pytest.raises(InvalidInput, match="not signed"):
        reg._move("m", "prod", lambda c: [], statement, action="stage", staged="v2")
    with pytest.raises(InvalidInput, match="already"):
        reg.stage("m", "v1", "prod")  # the current version: nothing to stage
    with pytest.raises(VersionNotFound):
        reg.stage("m", "nope", "prod")


def test_the_move_that_makes_it_current_clears_it_and_other_moves_keep_it(reg):
    for v in ("v1", "v2", "v3"):
        commit(reg, v)
    reg.promote("m", "v1", "prod")
    reg.stage("m", "v3", "prod")
    assert reg.promote("m", "v2", "prod").staged_version == "v3"  # another version: still staged
    assert reg.promote("m", "v3", "prod").staged is None  # made current: cleared
    reg.stage("m", "v2", "prod")
    assert reg.rollback("m", "prod").staged is None  # the rollback returns to v2: cleared too
    reg.stage("m", "v3", "prod")
    assert reg.unstage("m", "prod").staged is None and reg.channel("m", "prod").version == "v2"
    assert reg.unstage("m", "prod").staged is None  # nothing staged: no change
    with pytest.raises(ChannelNotFound):
        reg.unstage("m", "other")


def test_gc_keeps_the_staged_version(reg):
    for v in ("v1", "v2", "v3"):
        commit(reg, v)
    reg.promote("m", "v3", "prod")
    reg.stage("m", "v1", "prod")
    gc(reg.store, keep=1, grace=0)
    assert reg.versions("m") == ["v1", "v3"]  # v2 went; the staged v1 stayed
