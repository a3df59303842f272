"""fabric.publish: round trips, exact dedup figures, and every bad source refused cleanly."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from fabric.core.chunking import CDC_MAX, SEGMENT_SIZE
from fabric.errors import (InvalidName, InvalidSafetensors, SourceChanged, SourceError,
                           VersionExists)
from fabric.core.manifest import diff
from fabric.store.registry import Registry

from helpers.files import (assert_same_tree, header_len, random_bytes, random_tensors, safetensors_bytes,
                           write_safetensors, write_tree)
from helpers.store import chunk_files, publish_local, pull_local


def _roundtrip(store, src: Path, tmp_path: Path, artifact="model", version="v1"):
    r = publish_local(store, src, artifact, version)
    dest = tmp_path / f"out-{artifact}-{version}"
    pull_local(store, artifact, version, dest)
    return r, dest


def _nothing_committed(store) -> bool:
    return Registry(store).artifacts() == [] and not (Path(store.backend.describe()) / "manifests").exists()


# --- round trips ---------------------------------------------------------------------------

def test_single_safetensors_file_round_trips(store, tmp_path, rng):
    tensors = random_tensors(rng, 5)
    tensors["ints"] = np.arange(1000, dtype=np.int64)
    tensors["none"] = np.zeros((0, 8), np.float16)
    src = write_safetensors(tmp_path / "src" / "model.safetensors", tensors, metadata={"format": "np"})
    r, dest = _roundtrip(store, src.parent, tmp_path)
    assert_same_tree(src.parent, dest)
    assert r.files == 1 and r.bytes == src.stat().st_size
    # publishing the file itself (not its folder) gives the same one-file version
    r2 = publish_local(store, src, "single", "v1")
    pull_local(store, "single", "v1", tmp_path / "single")
    assert (tmp_path / "single" / "model.safetensors").read_bytes() == src.read_bytes()
    assert r2.new_bytes == 0


def test_tensor_index_matches_the_file(store, tmp_path, rng):
    tensors = random_tensors(rng, 3)
    tensors["big"] = rng.standard_normal((SEGMENT_SIZE // 4 + 1000,)).astype(np.float32)  # 2 segments
    src = write_safetensors(tmp_path / "src" / "m.safetensors", tensors)
    publish_local(store, src.parent)
    m = Registry(store).manifest("model", "v1")
    data = src.read_bytes()
    assert {t.name for t in m.tensors} == set(tensors)
    for t in m.tensors:
        arr = tensors[t.name]
        assert (t.file, t.dtype, t.shape, t.length) == ("m.safetensors", "F32", arr.shape, arr.nbytes)
        assert data[t.offset:t.offset + t.length] == arr.tobytes()
        assert b"".join(store.get_chunk(c) for c in t.chunks) == arr.tobytes()
    assert len(next(t for t in m.tensors if t.name == "big").chunks) == 2
    assert m.chunking["safetensors"]["segment"] == SEGMENT_SIZE and m.chunking["hash"] == "blake3"


def test_sharded_safetensors_with_index_round_trip(store, tmp_path, rng):
    src = tmp_path / "src"
    weight_map = {}
    for i in range(1, 4):
        shard = f"model-{i:05d}-of-00003.safetensors"
        tensors = random_tensors(rng, 4, prefix=f"shard{i}")
        write_safetensors(src / shard, tensors)
        weight_map.update({name: shard for name in tensors})
    (src / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 3 * 4 * 64 * 64 * 4}, "weight_map": weight_map}, indent=2))
    (src / "config.json").write_text('{"hidden": 64}')
    r, dest = _roundtrip(store, src, tmp_path)
    assert_same_tree(src, dest)
    assert r.files == 5
    m = Registry(store).manifest("model", "v1")
    assert len(m.tensors) == 12 and {t.file for t in m.tensors} == set(weight_map.values())


def test_binary_nested_and_empty_files_round_trip(store, tmp_path, rng):
    src = write_tree(tmp_path / "src", {
        "blob.bin": random_bytes(rng, 700_000),
        "a/b/c/deep.bin": random_bytes(rng, 3000),
        "a/b/zeros.bin": bytes(300_000),
        "empty.txt": b"",
        "dir/also-empty": b"",
        "dir/sub/x.json": b'{"k": 1}',
        "tiny": b"x",
        "fake.safetensors.txt": b"not parsed as safetensors",
    }, modes={"tiny": 0o755, "empty.txt": 0o600})
    r, dest = _roundtrip(store, src, tmp_path)
    assert_same_tree(src, dest)
    assert r.files == 8
    m = Registry(store).manifest("model", "v1")
    assert next(f for f in m.files if f.path == "dir/also-empty").chunks == ()


def test_empty_folder_and_empty_file_sources(store, tmp_path):
    (tmp_path / "void").mkdir()
    r = publish_local(store, tmp_path / "void", "void", "v1")
    assert (r.files, r.bytes, r.dedup_ratio) == (0, 0, 1.0)
    pull_local(store, "void", "v1", tmp_path / "void-out")
    assert list((tmp_path / "void-out").iterdir()) == []
    (tmp_path / "e.bin").write_bytes(b"")
    publish_local(store, tmp_path / "e.bin", "e", "v1")
    pull_local(store, "e", "v1", tmp_path / "e-out")
    assert (tmp_path / "e-out" / "e.bin").read_bytes() == b""


def test_publish_records_parent_metadata_and_channel(store, tmp_path, rng):
    src = write_tree(tmp_path / "src", {"f": random_bytes(rng, 1000)})
    publish_local(store, src, version="v1", channel="prod")
    (src / "f").write_bytes(random_bytes(rng, 1000))
    r = publish_local(store, src, version="v2", channel="prod", metadata={"step": "200"})
    reg = Registry(store)
    m = reg.manifest("model", "v2")
    assert (r.parent, m.parent, m.metadata) == ("v1", "v1", {"step": "200"})
    assert reg.channel("model", "prod").version == "v2"
    r3 = publish_local(store, src, version=None)
    assert r3.version > "20" and reg.latest("model") == r3.version  # default: a UTC timestamp


# --- dedup, measured exactly -------------------------------------------------------------------

@pytest.fixture(scope="module")
def model50():
    return random_tensors(np.random.default_rng(50), 50)  # 50 distinct 16 KiB tensors


def test_same_folder_twice_stores_nothing_new(store, tmp_path, model50, rng):
    src = tmp_path / "src"
    write_safetensors(src / "model.safetensors", model50)
    write_tree(src, {"tokenizer.json": random_bytes(rng, 500_000)})
    r1 = publish_local(store, src, version="v1")
    assert r1.new_bytes == r1.bytes and r1.dedup_ratio == 0.0
    before = len(chunk_files(Path(store.backend.describe())))
    r2 = publish_local(store, src, version="v2")
    assert (r2.new_bytes, r2.new_chunks, r2.written_bytes, r2.dedup_ratio) == (0, 0, 0, 1.0)
    r3 = publish_local(store, src, artifact="other-artifact", version="v1")
    assert (r3.new_bytes, r3.new_chunks) == (0, 0)
    assert len(chunk_files(Path(store.backend.describe()))) == before


def test_changing_3_of_50_tensors_stores_exactly_those_tensors(store, tmp_path, model50, rng):
    write_safetensors(tmp_path / "v1" / "model.safetensors", model50)
    publish_local(store, tmp_path / "v1", version="v1")
    changed = dict(model50)
    names = ["layer.003", "layer.027", "layer.049"]
    for n in names:
        changed[n] = rng.standard_normal((64, 64)).astype(np.float32)
    path2 = write_safetensors(tmp_path / "v2" / "model.safetensors", changed)
    r = publish_local(store, tmp_path / "v2", version="v2")
    three = sum(changed[n].nbytes for n in names)
    assert three <= r.new_bytes <= three + header_len(path2)
    assert r.new_bytes == three  # same shapes, so the header is byte-identical and dedups
    d = diff(Registry(store).manifest("model", "v1"), Registry(store).manifest("model", "v2"))
    assert d.tensors_changed == tuple(f"model.safetensors:{n}" for n in names)
    assert d.new_bytes == three


def test_reordered_tensors_store_only_a_new_header(store, tmp_path, rng):
    tensors = list(random_tensors(rng, 10).items())
    tensors.append(("big", rng.standard_normal((SEGMENT_SIZE // 4 + 4096,)).astype(np.float32)))
    (tmp_path / "v1").mkdir()
    (tmp_path / "v1" / "m.safetensors").write_bytes(safetensors_bytes(tensors))
    publish_local(store, tmp_path / "v1", version="v1")
    reordered = tensors[::-1][:5] + tensors[:6][::-1]  # same tensors, every offset moves
    assert sorted(n for n, _ in reordered) == sorted(n for n, _ in tensors)
    (tmp_path / "v2").mkdir()
    p2 = tmp_path / "v2" / "m.safetensors"
    p2.write_bytes(safetensors_bytes(reordered))
    r = publish_local(store, tmp_path / "v2", version="v2")
    assert r.new_chunks == 1 and r.new_bytes == header_len(p2)
    pull_local(store, "model", "v2", tmp_path / "out")
    assert (tmp_path / "out" / "m.safetensors").read_bytes() == p2.read_bytes()


def test_adding_a_tensor_stores_it_and_the_header(store, tmp_path, model50, rng):
    write_safetensors(tmp_path / "v1" / "model.safetensors", model50)
    publish_local(store, tmp_path / "v1", version="v1")
    grown = dict(model50, **{"aaa.new": rng.standard_normal((32, 32)).astype(np.float32)})
    p2 = write_safetensors(tmp_path / "v2" / "model.safetensors", grown)
    r = publish_local(store, tmp_path / "v2", version="v2")
    assert r.new_bytes == header_len(p2) + 32 * 32 * 4


def test_editing_one_segment_of_a_big_tensor_stores_one_segment(store, tmp_path, rng):
    big = rng.standard_normal((2 * SEGMENT_SIZE // 4 + 100,)).astype(np.float32)  # 3 segments
    write_safetensors(tmp_path / "v1" / "m.safetensors", {"big": big})
    publish_local(store, tmp_path / "v1", version="v1")
    big2 = big.copy()
    big2[SEGMENT_SIZE // 4 + 5] += 1.0  # inside the second segment
    write_safetensors(tmp_path / "v2" / "m.safetensors", {"big": big2})
    r = publish_local(store, tmp_path / "v2", version="v2")
    assert (r.new_chunks, r.new_bytes) == (1, SEGMENT_SIZE)


@pytest.fixture(scope="module")
def jsonl_20mb():
    """About 20 MB of JSON lines with random content."""
    words = np.random.default_rng(20).integers(0, 1 << 40, size=(290_000, 3)).tolist()
    data = "".join(f'{{"id": {i}, "text": "{a:x} {b:x} {c:x}", "label": {a % 7}}}\n'
                   for i, (a, b, c) in enumerate(words)).encode()
    assert 19_000_000 < len(data) < 23_000_000
    return data


def test_appending_one_percent_to_a_jsonl_stores_about_the_tail(store, tmp_path, jsonl_20mb):
    data = jsonl_20mb
    f = tmp_path / "src" / "train.jsonl"
    f.parent.mkdir()
    f.write_bytes(data)
    r1 = publish_local(store, f.parent, version="v1")
    assert r1.bytes == len(data)
    extra = "".join(f'{{"id": {i}, "text": "appended row {i}", "label": 0}}\n'
                    for i in range(len(data) // 100 // 45)).encode()
    assert len(extra) >= len(data) // 110  # ~1%
    with open(f, "ab") as fh:
        fh.write(extra)
    r2 = publish_local(store, f.parent, version="v2")
    assert len(extra) <= r2.new_bytes < len(extra) + 2 * CDC_MAX
    pull_local(store, "model", "v2", tmp_path / "out")
    assert (tmp_path / "out" / "train.jsonl").read_bytes() == data + extra


def test_editing_the_middle_of_a_jsonl_stores_a_few_chunks(store, tmp_path, jsonl_20mb):
    data = jsonl_20mb
    f = tmp_path / "src" / "train.jsonl"
    f.parent.mkdir()
    f.write_bytes(data)
    publish_local(store, f.parent, version="v1")
    edited = bytearray(data)
    mid = len(edited) // 2
    edited[mid:mid + 20] = b"EDITED-IN-THE-MIDDLE"
    f.write_bytes(bytes(edited))
    r = publish_local(store, f.parent, version="v2")
    assert 0 < r.new_bytes < 3 * CDC_MAX


# --- bad sources: a clear error, and no version ---------------------------------------------------

def test_missing_source(store, tmp_path):
    with pytest.raises(SourceError, match="does not exist") as e:
        publish_local(store, tmp_path / "nope")
    assert str(tmp_path / "nope") in e.value.message and _nothing_committed(store)


def test_fifo_as_source_and_inside_a_folder(store, tmp_path):
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(SourceError, match="neither a file nor a folder"):
        publish_local(store, tmp_path / "pipe")
    src = write_tree(tmp_path / "src", {"ok.bin": b"fine"})
    os.mkfifo(src / "pipe")
    with pytest.raises(SourceError, match="pipe is not a regular file"):
        publish_local(store, src)
    assert _nothing_committed(store) and chunk_files(Path(store.backend.describe())) == []


def test_dangling_symlink(store, tmp_path):
    src = write_tree(tmp_path / "src", {"ok.bin": b"fine"})
    (src / "dangling").symlink_to(src / "gone")
    with pytest.raises(SourceError, match="dangling is a broken symlink"):
        publish_local(store, src)
    (tmp_path / "link-src").symlink_to(tmp_path / "gone-too")
    with pytest.raises(SourceError, match="does not exist"):
        publish_local(store, tmp_path / "link-src")
    assert _nothing_committed(store)


def test_symlink_loop(store, tmp_path):
    src = write_tree(tmp_path / "src", {"ok.bin": b"fine"})
    (src / "self").symlink_to("self")
    with pytest.raises(SourceError, match="self"):
        publish_local(store, src)
    os.unlink(src / "self")
    (src / "sub").mkdir()
    (src / "sub" / "up").symlink_to("..")
    with pytest.raises(SourceError, match="sub/up is a symlink loop"):
        publish_local(store, src)
    assert _nothing_committed(store)


@pytest.mark.parametrize("kind", ["file", "folder"])
def test_symlink_pointing_outside_the_source(store, tmp_path, kind):
    outside = write_tree(tmp_path / "outside", {"secret.txt": b"keys"})
    src = write_tree(tmp_path / "src", {"ok.bin": b"fine"})
    (src / "sub").mkdir()
    (src / "sub" / "escape").symlink_to(outside / "secret.txt" if kind == "file" else outside)
    with pytest.raises(SourceError, match="sub/escape is a symlink pointing outside the source"):
        publish_local(store, src)
    assert _nothing_committed(store)


def test_symlinks_inside_the_source_are_followed(store, tmp_path):
    src = write_tree(tmp_path / "src", {"real/data.bin": b"payload"})
    (src / "alias.bin").symlink_to("real/data.bin")
    (src / "alias-dir").symlink_to("real")
    publish_local(store, src)
    pull_local(store, "model", "v1", tmp_path / "out")
    out = tmp_path / "out"
    assert (out / "alias.bin").read_bytes() == (out / "alias-dir" / "data.bin").read_bytes() == b"payload"
    assert not (out / "alias.bin").is_symlink()


def test_unpublishable_file_name(store, tmp_path):
    src = write_tree(tmp_path / "src", {"ok.bin": b"fine", "back\\slash": b"x"})
    with pytest.raises(SourceError, match="file name cannot be published"):
        publish_local(store, src)
    assert _nothing_committed(store)


def test_invalid_artifact_or_version_name(store, tmp_path):
    src = write_tree(tmp_path / "src", {"f": b"x"})
    with pytest.raises(InvalidName):
        publish_local(store, src, artifact="../evil")
    with pytest.raises(InvalidName):
        publish_local(store, src, version="v 1")
    with pytest.raises(InvalidName):
        publish_local(store, src, channel="pr/od")
    assert _nothing_committed(store) and chunk_files(Path(store.backend.describe())) == []


# a file that changes while it is read: the progress callback runs between reads, so the
# change lands mid-publish, every time, with no mocks and no timing

def _change_once(path: Path, how: str):
    done = []

    def progress(_n):
        if done:
            return
        done.append(True)
        if how == "append":
            with open(path, "ab") as f:
                f.write(b"late bytes")
        elif how == "truncate":
            os.truncate(path, path.stat().st_size // 2)
        else:  # rewrite one byte in place: same size, new mtime
            with open(path, "r+b") as f:
                f.seek(5)
                f.write(b"!")
    return progress


@pytest.mark.parametrize("how", ["append", "truncate", "rewrite"])
@pytest.mark.parametrize("kind", ["data.bin", "model.safetensors"])
def test_file_changing_during_publish(store, tmp_path, rng, how, kind):
    src = tmp_path / "src"
    if kind == "data.bin":
        write_tree(src, {kind: random_bytes(rng, 20 << 20)})  # several 8 MiB read windows
    else:
        write_safetensors(src / kind, random_tensors(rng, 3, shape=(1024, 1024)))
    os.utime(src / kind, ns=(1_000_000_000, 1_000_000_000))  # so an in-place write surely moves mtime
    with pytest.raises(SourceChanged, match=kind.replace(".", r"\.")):
        publish_local(store, src, progress=_change_once(src / kind, how))
    assert _nothing_committed(store)


def test_version_exists_with_different_content(store, tmp_path, rng):
    a = write_tree(tmp_path / "a", {"f": random_bytes(rng, 1000)})
    b = write_tree(tmp_path / "b", {"f": random_bytes(rng, 1000)})
    r1 = publish_local(store, a, version="v1")
    with pytest.raises(VersionExists, match="model@v1 already exists"):
        publish_local(store, b, version="v1")
    assert Registry(store).manifest_id("model", "v1") == r1.manifest_id
    again = publish_local(store, a, version="v1")  # the same content again is fine
    assert again.manifest_id == r1.manifest_id and again.new_bytes == 0
    pull_local(store, "model", "v1", tmp_path / "out")
    assert_same_tree(a, tmp_path / "out")


@pytest.mark.parametrize("name, data, needle", [
    ("short.safetensors", b"\x05\x00", "too short"),
    ("long-header.safetensors", (1000).to_bytes(8, "little") + b"{}", "longer than the file"),
    ("not-json.safetensors", None, "not valid JSON"),
    ("range.safetensors", {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 999]}}, "out of range"),
    ("overlap.safetensors", {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                             "v": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}, "overlap"),
    ("dtype.safetensors", {"w": {"dtype": "Q4", "shape": [4], "data_offsets": [0, 16]}}, "unknown dtype"),
    ("size.safetensors", {"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 16]}}, "want 12"),
])
def test_invalid_safetensors_are_refused_naming_the_file(store, tmp_path, name, data, needle):
    src = tmp_path / "src"
    src.mkdir()
    w = np.arange(4, dtype=np.float32)
    if data is None:
        data = safetensors_bytes([("w", w)], raw_header=b"{'w': 1}")
    elif isinstance(data, dict):
        data = safetensors_bytes([("w", w)], header=data)
    (src / name).write_bytes(data)
    with pytest.raises(InvalidSafetensors, match=needle) as e:
        publish_local(store, src)
    assert e.value.message.startswith(f"{name}: ")
    assert _nothing_committed(store) and chunk_files(Path(store.backend.describe())) == []


def test_publishing_loads_no_http_client_and_the_package_names_stay_the_functions():
    """`import fabric.publish` (what `fabric publish` and its benchmark child need) leaves the
    pull path and aiohttp unloaded; `fabric.pull`/`fabric.publish` are the functions however
    their modules were imported."""
    import subprocess
    import sys
    code = ("import sys, fabric.publish, fabric.store.store\n"
            "assert 'aiohttp' not in sys.modules and 'fabric.pull' not in sys.modules, sorted(sys.modules)\n"
            "import fabric, fabric.pull\n"
            "from fabric import pull, publish, open_store, Manifest, tracing\n"
            "assert fabric.pull is pull and pull.__module__ == 'fabric.pull' and callable(pull)\n"
            "assert fabric.publish is publish and publish.__module__ == 'fabric.publish'\n"
            "assert open_store.__module__ == 'fabric.store.store' and Manifest.__name__ == 'Manifest'\n"
            "assert tracing.__name__ == 'fabric.tracing'\n"
            "try:\n    fabric.nothing\nexcept AttributeError:\n    print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout == "ok\n", out.stderr
