"""fabric.pull: materialise a version atomically; refuse to clobber; verify every chunk."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from fabric.errors import (ArtifactNotFound, ChannelNotFound, CorruptChunk, DestinationExists,
                           MissingChunks, VersionNotFound)
from fabric.pull import materialize
from fabric.store.registry import Registry
from fabric.store.store import chunk_key

from helpers.files import assert_same_tree, random_bytes, read_tree, used_bytes, write_safetensors, write_tree
from helpers.store import publish_local, pull_local


@pytest.fixture
def published(store, tmp_path, rng):
    src = write_tree(tmp_path / "src", {
        "weights.bin": random_bytes(rng, 400_000),
        "nested/dir/cfg.json": b'{"a": 1}',
        "nested/empty": b"",
    }, modes={"weights.bin": 0o640, "nested/dir/cfg.json": 0o755})
    publish_local(store, src, "m", "v1")
    return src


def _leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".fabric-" in p.name]


def test_pull_is_byte_identical_with_modes(store, published, tmp_path):
    dest = tmp_path / "deep" / "new" / "dest"  # parents are created
    m = pull_local(store, "m", "v1", dest)
    assert_same_tree(published, dest)
    assert m.size == sum(len(b) for b, _ in read_tree(dest).values())
    assert _leftovers(dest.parent) == []


def test_pull_into_an_existing_empty_folder(store, published, tmp_path):
    dest = tmp_path / "empty"
    dest.mkdir()
    pull_local(store, "m", "v1", dest)
    assert_same_tree(published, dest)


@pytest.mark.parametrize("kind", ["folder", "file"])
def test_non_empty_destination_is_refused_and_left_alone(store, published, tmp_path, kind):
    dest = tmp_path / "dest"
    if kind == "folder":
        write_tree(dest, {"mine.txt": b"do not touch"})
    else:
        dest.write_bytes(b"a file in the way")
    before = read_tree(dest) if kind == "folder" else dest.read_bytes()
    with pytest.raises(DestinationExists, match="--force") as e:
        pull_local(store, "m", "v1", dest)
    assert isinstance(e.value, FileExistsError)
    assert (read_tree(dest) if kind == "folder" else dest.read_bytes()) == before
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("kind", ["folder", "file"])
def test_force_replaces_the_destination(store, published, tmp_path, kind):
    dest = tmp_path / "dest"
    if kind == "folder":
        write_tree(dest, {"stale.txt": b"old", "nested/dir/cfg.json": b"old"})
    else:
        dest.write_bytes(b"old")
    pull_local(store, "m", "v1", dest, overwrite=True)
    assert_same_tree(published, dest)  # stale.txt is gone
    assert _leftovers(tmp_path) == []


def test_unknown_artifact_version_channel(store, published, tmp_path):
    reg = Registry(store)
    with pytest.raises(ArtifactNotFound, match="'ghost'"):
        reg.resolve("ghost")
    with pytest.raises(ArtifactNotFound):
        reg.resolve("ghost", version="v1")
    with pytest.raises(VersionNotFound, match="'v7'"):
        reg.resolve("m", version="v7")
    with pytest.raises(ChannelNotFound, match="m:prod"):
        reg.resolve("m", channel="prod")
    assert not (tmp_path / "dest").exists()


def test_missing_chunk_fails_before_writing(store, published, tmp_path):
    m = Registry(store).manifest("m", "v1")
    store.delete_chunk(m.files[-1].chunks[0][0])
    dest = tmp_path / "dest"
    with pytest.raises(MissingChunks, match="lacks 1 chunk"):
        materialize(store, m, dest)
    assert not dest.exists() and _leftovers(tmp_path) == []


def test_corrupt_chunk_fails_and_leaves_the_old_destination(store, published, tmp_path):
    m = Registry(store).manifest("m", "v1")
    cid = next(f for f in m.files if f.path == "weights.bin").chunks[-1][0]
    path = Path(store.backend.describe()) / chunk_key(cid)
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    path.write_bytes(bytes(raw))
    dest = write_tree(tmp_path / "dest", {"previous.txt": b"the version before"})
    before = read_tree(dest)
    with pytest.raises(CorruptChunk, match=cid):
        materialize(store, m, dest, overwrite=True)
    assert read_tree(dest) == before
    assert _leftovers(tmp_path) == []


def test_pull_reports_progress_in_bytes(store, published, tmp_path):
    seen = []
    m = Registry(store).manifest("m", "v1")
    materialize(store, m, tmp_path / "dest", progress=seen.append)
    assert sum(seen) == m.size


def test_file_permissions_and_umask(store, published, tmp_path):
    old = os.umask(0o077)
    try:
        pull_local(store, "m", "v1", tmp_path / "dest")
    finally:
        os.umask(old)
    assert (os.stat(tmp_path / "dest" / "nested" / "dir" / "cfg.json").st_mode & 0o777) == 0o755


def test_a_site_folder_already_there_gives_the_store_its_missing_chunks_without_fetching(store, published, tmp_path):
    # A restart after the rename, or a rollback: the folder verifies, and the chunks the store
    # lacks are referenced in its files (linked as packs), not fetched (the upstream is unreachable).
    import asyncio

    from fabric.pull import Sink, Upstream, pull
    from fabric.wire.client import OriginClient

    m = Registry(store).manifest("m", "v1")
    folder = tmp_path / "versions" / "m" / "v1"
    asyncio.run(pull(store, m, Sink.site_version(folder)))
    for cid in m.chunk_ids():
        store.delete_chunk(cid)
    result = asyncio.run(pull(store, m, Sink.site_version(folder),
                              upstream=Upstream([OriginClient("http://127.0.0.1:9", "t" * 20)])))
    assert result.packed and result.chunks_fetched == 0
    assert (folder / "weights.bin").read_bytes() == (published / "weights.bin").read_bytes()
    refs = dict(store.pack_refs())
    assert set(refs) == set(m.chunk_ids())  # every chunk back, each a reference
    folder_files = {p.stat().st_ino for p in folder.rglob("*") if p.is_file()}
    assert {os.stat(store.backend.path(r.pack)).st_ino for r in refs.values()} <= folder_files
    for cid in m.chunk_ids():
        assert store.get_chunk(cid)  # verified


def test_a_site_links_a_file_unchanged_since_an_older_version_instead_of_writing_it(store, tmp_path, rng):
    import asyncio

    from fabric.core import seal
    from fabric.pull import Sink, pull

    same, old, new = random_bytes(rng, 300_000), random_bytes(rng, 200_000), random_bytes(rng, 200_000)
    publish_local(store, write_tree(tmp_path / "v1", {"a.bin": same, "b.bin": old}), "m", "v1")
    publish_local(store, write_tree(tmp_path / "v2", {"a.bin": same, "b.bin": new}), "m", "v2")
    publish_local(store, write_tree(tmp_path / "v3", {"a.bin": same, "b.bin": new}, modes={"a.bin": 0o600}), "m", "v3")
    reg, folders = Registry(store), {v: tmp_path / "site" / v for v in ("v1", "v2", "v3")}
    for v, folder in folders.items():
        asyncio.run(pull(store, reg.manifest("m", v), Sink.site_version(folder)))
        sealed = seal.decode((folder / seal.SEAL_FILE).read_bytes())  # the site's seal, beside the files
        m = reg.manifest("m", v)
        held = {cid: data for e in m.files for cid, data in _chunks_of(folder / e.path, e.chunks)}
        assert all(sealed.get(cid) == seal.xxh(data) for cid, data in held.items())  # linked ones too
        (folder / seal.SEAL_FILE).unlink()
        assert_same_tree(tmp_path / v, folder)
    assert (folders["v2"] / "a.bin").samefile(folders["v1"] / "a.bin")  # unchanged: one file, two versions
    assert not (folders["v2"] / "b.bin").samefile(folders["v1"] / "b.bin")
    assert not (folders["v3"] / "a.bin").samefile(folders["v1"] / "a.bin")  # its mode differs: a file of its own
    assert (folders["v3"] / "a.bin").stat().st_mode & 0o777 == 0o600
    assert (folders["v1"] / "a.bin").stat().st_mode & 0o777 == 0o644


def _chunks_of(path, chunks):
    with open(path, "rb") as f:
        for cid, size in chunks:
            yield cid, f.read(size)


def test_a_site_version_lands_in_the_page_cache_and_a_pulled_folder_around_it(tmp_path, rng):
    # a site's children fetch each chunk from its version files as soon as it lands (sendfile)
    # and its workers load the version next: those writes keep their pages; `fabric pull`'s
    # large writes skip the page cache (fabric.fileio, direct I/O), where the file system allows
    import asyncio

    from fabric import fileio
    from fabric.publish import publish
    from fabric.pull import Sink, Upstream, pull
    from fabric.store.store import open_store
    from fabric.wire.client import OriginClient, RemoteTarget, SyncOrigin
    from helpers.files import page_cache_share
    from helpers.origin import PUBLISH_SECRET, PULL_SECRET, start_origin

    src = tmp_path / "src"
    src.mkdir()
    write_safetensors(src / "w.safetensors", {f"t{i}": rng.integers(0, 255, 4 << 20, dtype=np.uint8) for i in range(6)})
    origin = start_origin(tmp_path / "origin")
    try:
        with SyncOrigin(origin.url, PUBLISH_SECRET) as so:
            publish(src, artifact="m", version="v1", target=RemoteTarget(so))
            manifest = so.manifest("m", "v1")

        async def fetch(sink: Sink, store_dir: Path) -> None:
            async with OriginClient(origin.url, PULL_SECRET) as client:
                await pull(open_store(store_dir), manifest, sink, upstream=Upstream([client]))

        asyncio.run(fetch(Sink.site_version(tmp_path / "site" / "v1"), tmp_path / "site-store"))
        asyncio.run(fetch(Sink.folder(tmp_path / "pulled", pack=True), tmp_path / "pull-cache"))
    finally:
        origin.stop()
    site, pulled = tmp_path / "site" / "v1" / "w.safetensors", tmp_path / "pulled" / "w.safetensors"
    share = page_cache_share(site), page_cache_share(pulled)
    assert site.read_bytes() == pulled.read_bytes() == (src / "w.safetensors").read_bytes()
    assert share[0] > 0.8, f"only {share[0]:.0%} of the site's version file is in the page cache"
    if os.stat(pulled).st_dev not in fileio._refused:
        assert share[1] < 0.2, f"{share[1]:.0%} of the pulled file went through the page cache"


def _two_versions(store, tmp_path, rng, changed=(2,)) -> dict[str, Path]:
    """v1: eight 1 MiB float32 tensors; v2: the tensors in `changed` redrawn (same layout)."""
    t1 = {f"w{i}": rng.standard_normal(1 << 18).astype(np.float32) for i in range(8)}
    t2 = {k: (rng.standard_normal(1 << 18).astype(np.float32) if int(k[1:]) in changed else v) for k, v in t1.items()}
    srcs = {}
    for v, tensors in (("v1", t1), ("v2", t2)):
        srcs[v] = write_safetensors(tmp_path / "src" / v / "model.safetensors", tensors).parent
        publish_local(store, srcs[v], "m", v)
    return srcs


def test_with_reflinks_a_site_shares_the_chunks_a_version_reuses_with_the_older_file(reflinks, tmp_path, rng):
    import asyncio

    from fabric.core import seal
    from fabric.pull import Sink, pull
    from fabric.store.store import open_store

    store = open_store(reflinks / "store")
    srcs = _two_versions(store, tmp_path, rng)
    reg, site = Registry(store), reflinks / "versions" / "m"
    asyncio.run(pull(store, reg.manifest("m", "v1"), Sink.site_version(site / "v1")))  # the store's chunks: packs in v1
    os.sync()
    before = used_bytes(reflinks)
    asyncio.run(pull(store, reg.manifest("m", "v2"), Sink.site_version(site / "v2")))
    os.sync()
    grown = used_bytes(reflinks) - before
    m2 = reg.manifest("m", "v2")
    assert (site / "v2" / "model.safetensors").read_bytes() == (srcs["v2"] / "model.safetensors").read_bytes()
    # 8 MiB file, 1 MiB of it new: the 7 reused MiB share v1's blocks (ext4 writes them again)
    assert grown < 2 << 20, f"v2 took {grown} bytes of new space"
    sealed = seal.decode((site / "v2" / seal.SEAL_FILE).read_bytes())
    held = dict(_chunks_of(site / "v2" / "model.safetensors", m2.files[0].chunks))
    assert all(sealed.get(cid) == seal.xxh(data) for cid, data in held.items())
    refs = dict(store.pack_refs())  # the reused chunks now refer to v2's file: v1 may go
    v2_ino = (site / "v2" / "model.safetensors").stat().st_ino
    assert {os.stat(store.backend.path(refs[c].pack)).st_ino for c in m2.chunk_ids()} == {v2_ino}
    for cid in m2.chunk_ids():
        assert store.get_chunk(cid)  # verified


def test_with_reflinks_spoiled_bytes_in_the_older_file_are_not_shared_into_a_version(reflinks, tmp_path, rng):
    import asyncio

    from fabric.pull import Sink, pull
    from fabric.store.store import open_store

    store = open_store(reflinks / "store")
    _two_versions(store, tmp_path, rng)
    reg, site = Registry(store), reflinks / "versions" / "m"
    asyncio.run(pull(store, reg.manifest("m", "v1"), Sink.site_version(site / "v1")))
    old = site / "v1" / "model.safetensors"
    st = old.stat()
    with open(old, "r+b") as f:  # edited in place, and its times put back: only the bytes tell
        f.seek(st.st_size - 1000)
        f.write(b"\x13\x37" * 8)
    os.utime(old, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(CorruptChunk):
        asyncio.run(pull(store, reg.manifest("m", "v2"), Sink.site_version(site / "v2")))
    assert not (site / "v2").exists() and _leftovers(site) == [], "no version, no staging folder left"
