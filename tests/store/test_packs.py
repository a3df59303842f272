"""Packs (fabric.store.packs): a pull writes each chunk once, into DEST, and the store
shares DEST's files through hard links; a publish into a local store appends its new
chunks to packs of its own (big ones with direct I/O).

Store level: references read back verified, a spoiled or missing pack is found and never
served as good, gc and fsck handle packs. End to end, with a real `fabric origin` and
the CLI: DEST's files are the store's packs; later pulls reuse them; an origin serving a
pulled store sends packed chunks (sendfile) byte for byte; a DEST file edited in place
is found at the next pull and its chunks fetched again; `--copy` and a store on another
file system keep copies instead.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from fabric.core import digest
from fabric.errors import ChunkNotFound, CorruptChunk
from fabric.fsck import fsck
from fabric.gc import gc
from fabric.store.registry import Registry
from fabric.store.store import chunk_key, open_store
from fabric.store.packs import PACK_MIN, REF_MAX, PackRef

from helpers.files import random_bytes, write_safetensors, write_tree
from helpers.store import publish_local, pull_local

from helpers.origin import (PULL_SECRET, OriginProcess, fabric_json, start_origin, tree_digest,
                            write_token_file)
from e2e.test_e2e_wire import Lab, make_model, unique_chunks

pytestmark = pytest.mark.timeout(240)


def packed_store(tmp_path: Path, parts: list[bytes]):
    """A store holding `parts` as packed chunks of one file (linked into it as a pack)."""
    store = open_store(tmp_path / "store")
    f = tmp_path / "file.bin"
    f.write_bytes(b"".join(parts))
    key = store.link_pack(f)
    assert key is not None
    ids, offset = [], 0
    for part in parts:
        cid = digest.digest(part)
        store.put_packed(cid, PackRef(key, offset, len(part)))
        ids.append(cid)
        offset += len(part)
    return store, f, key, ids


# --- the store -------------------------------------------------------------------------------

def test_packed_chunks_read_back_verified_in_every_form(tmp_path):
    parts = [os.urandom(5000), os.urandom(300), b"x" * 70]
    store, f, key, ids = packed_store(tmp_path, parts)
    assert os.stat(f).st_nlink == 2 and (store.backend.root / key).samefile(f)
    for cid, part in zip(ids, parts):
        assert store.has_chunk(cid)
        assert store.get_chunk(cid) == part
        assert store.get_chunk_stored(cid) == b"\x00" + part  # tag 0 on the wire: references stay home
        opened = store.open_stored(cid)
        with opened.file:
            assert (opened.tag, opened.size) == (0, len(part))
            assert os.pread(opened.file.fileno(), opened.size, opened.offset) == part
    assert store.stored_sizes(ids) == [1 + len(p) for p in parts]
    assert dict(store.pack_refs()) == {cid: PackRef(key, off, len(p))
                                       for cid, off, p in zip(ids, [0, 5000, 5300], parts)}


def test_a_spoiled_pack_is_corruption_and_a_missing_one_is_absence(tmp_path):
    parts = [os.urandom(4000), os.urandom(4000)]
    store, f, key, ids = packed_store(tmp_path, parts)
    with open(f, "r+b") as w:  # an edit in place, as `save_file` over DEST would do
        w.write(b"\0" * 10)
    with pytest.raises(CorruptChunk):
        store.get_chunk(ids[0])
    assert store.get_chunk(ids[1]) == parts[1]
    report = fsck(store, repair=True)
    assert report.bad_chunks == [ids[0]] and not store.has_chunk(ids[0]) and store.has_chunk(ids[1])

    os.truncate(f, 4500)  # shorter than the second reference says
    with pytest.raises(ChunkNotFound):
        store.get_chunk(ids[1])
    assert store.stored_sizes([ids[1]]) == [None] and store.open_stored(ids[1]) is None
    os.unlink(f)
    os.unlink(store.backend.root / key)
    with pytest.raises(ChunkNotFound, match="gone"):
        store.get_chunk(ids[1])


@pytest.mark.parametrize("ref", [b"\xffpacks/ab/../../../etc/passwd 0 10", b"\xffpacks/ab/cd 0 10",
                                 b"\xffpacks/ab/ab" + b"0" * 30 + b" -1 10", b"\xff" + b"x" * 300,
                                 b"\xffpacks/ab/ab" + b"0" * 30 + b" 0 9999999999"])
def test_a_malformed_reference_is_refused(tmp_path, ref):
    store = open_store(tmp_path / "store")
    cid = digest.digest(b"hello")
    store.backend.put(chunk_key(cid), ref)
    with pytest.raises(ChunkNotFound):
        store.get_chunk(cid)
    assert list(store.pack_refs()) == []
    if len(ref) <= REF_MAX:  # a server sends "missing" (longer: tag 0xFF on the wire, which receivers refuse)
        assert store.open_stored(cid) is None and store.stored_sizes([cid]) == [None]


# --- packs a publish writes ---------------------------------------------------------------------

def _model(root: Path, rng) -> Path:
    """Chunks of every kind: a small header, an aligned 8 MiB segment, a 1 MiB + 12 byte one
    (direct I/O with an unaligned tail), a 200 KiB one, a 100-byte tail, and CDC chunks."""
    write_safetensors(root / "model.safetensors", {
        "big": rng.standard_normal((8 << 20) // 4 + 25).astype(np.float32),  # 8 MiB, then 100 bytes
        "odd": rng.integers(0, 256, (1 << 20) + 12, dtype=np.uint8),
        "mid": rng.standard_normal(50_000).astype(np.float32),
    })
    write_tree(root, {"blob.bin": random_bytes(rng, 600_000)})
    return root


def test_publish_gives_each_big_chunk_a_pack_of_its_own(tmp_path, rng):
    store = open_store(tmp_path / "store", compress=False)
    src = _model(tmp_path / "src", rng)
    r = publish_local(store, src)
    m = Registry(store).manifest("model", "v1")
    sizes = {cid: n for f in m.files for cid, n in f.chunks}
    refs = dict(store.pack_refs())
    assert set(refs) == {cid for cid, n in sizes.items() if n >= PACK_MIN} and len(refs) == 2
    assert len({ref.pack for ref in refs.values()}) == len(refs) == len(list(store.iter_packs()))
    for cid, ref in refs.items():  # the pack is the chunk's bytes, nothing else
        assert (ref.offset, ref.size) == (0, sizes[cid])
        assert (store.backend.root / ref.pack).read_bytes() == store.get_chunk(cid)
    assert r.new_bytes == r.bytes and r.chunks == len(sizes)
    assert r.written_bytes == r.new_bytes + len(sizes) - len(refs)  # an object's tag byte; a pack holds raw bytes
    assert os.listdir(store.backend.root / "tmp") == []
    pull_local(store, "model", "v1", tmp_path / "out")
    for name in ("model.safetensors", "blob.bin"):
        assert (tmp_path / "out" / name).read_bytes() == (src / name).read_bytes()
    assert fsck(store).ok and fsck(store).chunks == len(sizes)


@pytest.mark.parametrize("form", ["bytes", "bytearray", "offset view"])
def test_a_pack_writer_takes_unaligned_buffers_through_its_staging_block(tmp_path, rng, form):
    from fabric.store.packs import PackWriter
    store = open_store(tmp_path / "store", compress=False)
    data = random_bytes(rng, (3 << 20) + 4097)  # longer than the 1 MiB staging block, tail unaligned
    given = {"bytes": data, "bytearray": memoryview(bytearray(data)),
             "offset view": memoryview(bytearray(b"x" + data))[1:]}[form]
    writer, cid = PackWriter(store), digest.digest(data)
    assert writer.put(cid, given) == len(data) and not store.has_chunk(cid)  # visible after the flush
    writer.flush()
    ((got, ref),) = store.pack_refs()
    assert got == cid and (ref.offset, ref.size) == (0, len(data))
    assert (store.backend.root / ref.pack).stat().st_size == len(data) and store.get_chunk(cid) == data


def test_with_compression_a_chunk_that_shrinks_stays_an_object(tmp_path, rng):
    store = open_store(tmp_path / "store")
    src = tmp_path / "src"
    write_safetensors(src / "m.safetensors", {"zeros": np.zeros(2 << 18, np.float32),
                                              "noise": rng.integers(0, 256, 2 << 20, dtype=np.uint8)})
    r = publish_local(store, src)
    t = {t.name: t.chunks for t in Registry(store).manifest("model", "v1").tensors}
    refs = dict(store.pack_refs())
    assert t["noise"][0] in refs and t["zeros"][0] not in refs
    assert r.written_bytes < r.new_bytes - (1 << 20)  # the zeros were stored compressed
    assert store.get_chunk(t["zeros"][0]) == bytes(2 << 20)


def test_a_spoiled_publish_pack_is_found_and_the_chunk_stored_again(tmp_path, rng):
    store = open_store(tmp_path / "store", compress=False)
    src = _model(tmp_path / "src", rng)
    publish_local(store, src)
    cid, ref = next((c, ref) for c, ref in store.pack_refs() if ref.size >= 8 << 20)
    with open(store.backend.root / ref.pack, "r+b") as f:
        f.seek(7)
        f.write(b"\x00\x01\x02")
    with pytest.raises(CorruptChunk):
        store.get_chunk(cid)
    report = fsck(store, repair=True)
    assert report.bad_chunks == [cid] and report.bad_versions == ["model@v1: 1 chunk(s) missing"]
    r = publish_local(store, src, version="v2")
    assert (r.new_chunks, r.new_bytes) == (1, ref.size)
    assert fsck(store).ok


def test_gc_frees_the_packs_of_a_deleted_version_and_keeps_those_still_named(tmp_path, rng):
    store = open_store(tmp_path / "store", compress=False)
    a, b = (rng.integers(0, 256, 2 << 20, dtype=np.uint8) for _ in range(2))
    write_safetensors(tmp_path / "v1" / "m.safetensors", {"a": a, "b": b})
    write_safetensors(tmp_path / "v2" / "m.safetensors", {"a": a, "b": b[::-1].copy()})  # b changes
    publish_local(store, tmp_path / "v1", version="v1")
    publish_local(store, tmp_path / "v2", version="v2")
    refs = dict(store.pack_refs())
    assert len(refs) == 3 and gc(store, keep=None, grace=0).packs_deleted == 0
    v1_b = Registry(store).manifest("model", "v1").tensors[1].chunks[0]
    Registry(store).delete_version("model", "v1")
    assert gc(store, keep=None, grace=3600).packs_deleted == 0  # young: a publish may be writing them
    report = gc(store, keep=None, grace=0)
    assert report.packs_deleted == 1 and report.bytes_freed >= 2 << 20  # v1's b: its bytes go with it
    assert {i.key for i in store.iter_packs()} == {ref.pack for cid, ref in refs.items() if cid != v1_b}
    pull_local(store, "model", "v2", tmp_path / "out")
    assert (tmp_path / "out" / "m.safetensors").read_bytes() == (tmp_path / "v2" / "m.safetensors").read_bytes()


# --- end to end ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    root = tmp_path_factory.mktemp("packs")
    o = start_origin(root)
    lab = Lab(root, o)
    src = make_model(root / "src", tensors=6, tensor_bytes=4 << 20, seed=3)
    lab.publish(src, "m", "v1")
    yield lab
    o.stop()


def test_pull_writes_once_and_the_store_shares_dest(lab):
    site, dest = lab.root / "site-a", lab.root / "dest-a"
    report = fabric_json(*lab.pull_args("m@v1", dest, site))
    assert report["packed"] is True and report["chunks_fetched"] == len(unique_chunks(lab.manifest("m", "v1")))
    assert tree_digest(dest) == tree_digest(lab.root / "src")
    weights = dest / "model.safetensors"
    assert weights.stat().st_nlink == 2  # DEST's file is also the store's pack
    packs = [p for p in (site / "packs").rglob("*") if p.is_file()]
    assert any(p.samefile(weights) for p in packs)
    assert fabric_json("fsck", "--store", site)["ok"]

    again = fabric_json(*lab.pull_args("m@v1", lab.root / "dest-a2", site))
    assert (again["chunks_fetched"], again["bytes_received"]) == (0, 0)
    assert tree_digest(lab.root / "dest-a2") == tree_digest(lab.root / "src")
    # the store keeps its chunks when DEST goes
    shutil.rmtree(dest)
    shutil.rmtree(lab.root / "dest-a2")
    assert fabric_json("fsck", "--store", site)["ok"]
    third = fabric_json(*lab.pull_args("m@v1", lab.root / "dest-a3", site))
    assert third["chunks_fetched"] == 0
    assert tree_digest(lab.root / "dest-a3") == tree_digest(lab.root / "src")


def test_an_origin_serves_a_pulled_store_byte_for_byte(lab):
    site = lab.root / "site-b"
    fabric_json(*lab.pull_args("m@v1", lab.root / "dest-b", site))
    tokens = write_token_file(lab.root / "served-tokens.toml")
    with OriginProcess(site, tokens, lab.root / "served.log") as served:  # packed chunks, sendfile
        report = fabric_json("pull", "m@v1", lab.root / "dest-b2", "--origin", served.url, "--token", PULL_SECRET,
                             "--store", lab.root / "site-b2")
    assert report["chunks_fetched"] == len(unique_chunks(lab.manifest("m", "v1")))
    assert tree_digest(lab.root / "dest-b2") == tree_digest(lab.root / "src")


def test_a_dest_file_edited_in_place_is_fetched_again(lab):
    site, dest = lab.root / "site-c", lab.root / "dest-c"
    fabric_json(*lab.pull_args("m@v1", dest, site))
    with open(dest / "model.safetensors", "r+b") as f:  # rewrite part of a tensor in place
        f.seek(5 << 20)
        f.write(os.urandom(1 << 20))
    report = fabric_json(*lab.pull_args("m@v1", lab.root / "dest-c2", site))
    assert report["chunks_fetched"] == 1  # the one 8 MiB segment the edit spoiled
    assert tree_digest(lab.root / "dest-c2") == tree_digest(lab.root / "src")
    assert fabric_json("fsck", "--store", site)["ok"]


def test_copy_and_another_file_system_keep_copies(lab):
    site, dest = lab.root / "site-d", lab.root / "dest-d"
    report = fabric_json(*lab.pull_args("m@v1", dest, site, "--copy"))
    assert report["packed"] is False and (dest / "model.safetensors").stat().st_nlink == 1
    assert not (site / "packs").exists() or not any((site / "packs").rglob("*"))
    assert tree_digest(dest) == tree_digest(lab.root / "src")

    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(lab.root).st_dev:
        pytest.skip("no tmpfs on another file system here")
    other = shm / f"fabric-test-store-{os.getpid()}"
    try:
        report = fabric_json(*lab.pull_args("m@v1", lab.root / "dest-e", other))
        assert report["packed"] is False and report["chunks_fetched"] > 0
        assert tree_digest(lab.root / "dest-e") == tree_digest(lab.root / "src")
        assert fabric_json("fsck", "--store", other)["ok"]
    finally:
        shutil.rmtree(other, ignore_errors=True)


def test_gc_deletes_a_pack_once_nothing_points_into_it(lab):
    site, dest = lab.root / "site-f", lab.root / "dest-f"
    fabric_json(*lab.pull_args("m@v1", dest, site))
    store = open_store(site, create=False)
    packs = list(store.iter_packs())
    assert Registry(store).versions("m") == ["v1"] and packs
    assert gc(store, keep=1, grace=0).packs_deleted == 0  # v1's chunks point into them

    Registry(store).delete_version("m", "v1")
    assert gc(store, keep=1, grace=3600).packs_deleted == 0  # young: a pull may be writing them
    report = gc(store, keep=1, grace=0)
    assert report.packs_deleted == len(packs) and not list(store.iter_packs())
    assert tree_digest(dest) == tree_digest(lab.root / "src")  # DEST keeps its files: only the links went
    assert (dest / "model.safetensors").stat().st_nlink == 1


def test_a_newer_pull_takes_over_the_shared_chunks_so_old_packs_can_go(lab):
    v1 = make_model(lab.root / "r1", tensors=6, tensor_bytes=4 << 20, seed=7)
    v2 = make_model(lab.root / "r2", tensors=6, tensor_bytes=4 << 20, seed=8, changed=(2,))
    lab.publish(v1, "r", "v1")
    lab.publish(v2, "r", "v2")
    site = lab.root / "site-g"
    fabric_json(*lab.pull_args("r@v1", lab.root / "dest-g1", site))
    old_packs = {p.key for p in open_store(site, create=False).iter_packs()}
    second = fabric_json(*lab.pull_args("r@v2", lab.root / "dest-g2", site))
    assert second["chunks_reused"] > second["chunks_fetched"] > 0
    store = open_store(site, create=False)
    v2_chunks = Registry(store).manifest("r", "v2").unique_chunks()
    refs = dict(store.pack_refs())
    assert {refs[c].pack for c in v2_chunks}.isdisjoint(old_packs)  # all of v2 lives in v2's files
    assert {refs[c].pack for c in set(refs) - set(v2_chunks)} <= old_packs  # v1's changed tensor stays
    assert fabric_json("fsck", "--store", site)["ok"]

    Registry(store).delete_version("r", "v1")
    report = gc(store, keep=1, grace=0)
    assert report.packs_deleted == len(old_packs)
    assert {p.key for p in store.iter_packs()}.isdisjoint(old_packs)
    third = fabric_json(*lab.pull_args("r@v2", lab.root / "dest-g3", site))
    assert third["chunks_fetched"] == 0
    assert tree_digest(lab.root / "dest-g3") == tree_digest(v2)


def test_pull_over_the_same_dest_with_force(lab):
    v1 = make_model(lab.root / "s1", tensors=4, tensor_bytes=4 << 20, seed=11)
    v2 = make_model(lab.root / "s2", tensors=4, tensor_bytes=4 << 20, seed=12, changed=(0,))
    lab.publish(v1, "s", "v1")
    lab.publish(v2, "s", "v2")
    site, dest = lab.root / "site-h", lab.root / "dest-h"
    fabric_json(*lab.pull_args("s@v1", dest, site))
    report = fabric_json(*lab.pull_args("s@v2", dest, site, "--force"))  # reads v1's packs = the old DEST
    assert report["packed"] is True and report["chunks_reused"] > 0
    assert tree_digest(dest) == tree_digest(v2)
    assert (dest / "model.safetensors").stat().st_nlink == 2
    assert fabric_json("fsck", "--store", site)["ok"]
    again = fabric_json(*lab.pull_args("s@v1", dest, site, "--force"))  # v1 back, from the store alone
    assert again["chunks_fetched"] == 0 and tree_digest(dest) == tree_digest(v1)


# --- a site's packs: served only while intact, written once -----------------------------------

def test_a_pack_changed_after_its_references_is_checked_before_it_is_served(tmp_path, rng):
    parts = [random_bytes(rng, 300_000), random_bytes(rng, 200_000)]
    store, f, key, ids = packed_store(tmp_path, parts)
    assert store.open_stored(ids[0]) is not None  # untouched: served unread
    time.sleep(0.02)  # past the file system's clock tick
    with open(f, "r+b") as fh:  # a program writes into the second chunk, in place
        fh.seek(len(parts[0]) + 10)
        fh.write(b"\0" * 16)
    first = store.open_stored(ids[0])  # the file changed, but this chunk still matches: served
    assert first is not None
    first.file.close()
    assert store.get_chunk_stored(ids[0])[1:] == parts[0]
    assert store.stored_sizes(ids) == [1 + len(parts[0]), None]  # found spoiled: not offered
    assert not store.has_chunk(ids[1])  # its reference is dropped, so it is fetched again
    assert store.open_stored(ids[1]) is None
    with pytest.raises(ChunkNotFound):
        store.get_chunk_stored(ids[1])


def test_a_pack_being_written_here_is_served_unread(tmp_path, rng):
    parts = [random_bytes(rng, 100_000)]
    store, f, key, ids = packed_store(tmp_path, parts)
    store.writing_pack(key)
    time.sleep(0.02)
    with open(f, "r+b") as fh:  # as an assembly writes the next chunk into it
        fh.seek(len(parts[0]))
        fh.write(b"more")
    assert store.stored_sizes(ids) == [1 + len(parts[0])] and store.has_chunk(ids[0])


def test_a_chunk_another_fetcher_stores_goes_into_the_version_being_assembled(tmp_path, rng):
    from fabric.pull import Assembly

    src = open_store(tmp_path / "src-store")
    publish_local(src, write_tree(tmp_path / "src", {"w.bin": random_bytes(rng, 600_000)}), "m", "v1")
    manifest = Registry(src).manifest("m", "v1")
    site = open_store(tmp_path / "site-store")
    assembly = Assembly(manifest, tmp_path / "versions" / "v1", pack_into=site, sealed=True)
    keep = assembly.keeper(defer=False)  # a site's deploy: takes what others store meanwhile
    ids = list(manifest.unique_chunks())
    keep(ids[0], src.get_chunk(ids[0]))
    for cid in ids[1:]:  # a relay's pull-through, say
        site.put_chunk(cid, src.get_chunk(cid), verified=True)
    assert assembly.fill_from_store(site) == 0  # nothing left to copy
    assembly.commit()
    dest = tmp_path / "versions" / "v1" / "w.bin"
    assert dest.read_bytes() == (tmp_path / "src" / "w.bin").read_bytes()
    refs = dict(site.pack_refs())
    assert set(refs) == set(ids)  # every chunk a reference into the version's file, no copy
    assert {os.stat(site.backend.path(r.pack)).st_ino for r in refs.values()} == {dest.stat().st_ino}
    late = random_bytes(rng, 1000)
    site.put_chunk(digest.digest(late), late)  # after the commit: an object of its own
    assert site.get_chunk(digest.digest(late)) == late
