"""fabric.core.manifest: canonical JSON, ids, validation of hostile manifests, diffs."""

from __future__ import annotations

import copy
import json

import pytest

from fabric.core import digest
from fabric.errors import InvalidChunkId, InvalidInput, InvalidManifest, InvalidName
from fabric.core.manifest import FileEntry, Manifest, TensorEntry, check_name, check_path, diff

A, B, C = (digest.digest(x) for x in (b"a", b"b", b"c"))


def _valid() -> dict:
    return {
        "format": "fabric.manifest/1",
        "artifact": "llama",
        "version": "v2",
        "parent": "v1",
        "created": "2026-01-02T03:04:05.000000Z",
        "chunking": {"hash": "blake3"},
        "metadata": {"step": "100"},
        "files": [
            {"path": "model.safetensors", "size": 30, "mode": 0o644, "chunks": [[A, 10], [B, 20]]},
            {"path": "sub/empty.txt", "size": 0, "mode": 0o600, "chunks": []},
        ],
        "tensors": [
            {"file": "model.safetensors", "name": "w", "dtype": "F32", "shape": [5],
             "offset": 10, "length": 20, "chunks": [B]},
        ],
    }


def test_valid_manifest_round_trips_canonically():
    m = Manifest.from_json(_valid())
    assert m.files[0].chunks == ((A, 10), (B, 20)) and m.size == 30
    canon = m.canonical()
    assert canon == json.dumps(json.loads(canon), sort_keys=True, separators=(",", ":")).encode()
    assert b" " not in canon.replace(b"\x20", b"") and b"\n" not in canon
    assert m.id == digest.digest(canon)
    again = Manifest.from_bytes(canon)
    assert again == m and again.id == m.id
    shuffled = _valid()
    shuffled["files"].reverse()
    assert Manifest.from_json(shuffled).id == m.id  # file order does not change the id
    assert list(m.chunk_ids()) == [A, B]
    assert m.unique_chunks() == {A: 10, B: 20}


def test_non_ascii_names_are_kept_as_utf8():
    obj = _valid()
    obj["files"][1]["path"] = "données/é.txt"
    m = Manifest.from_json(obj)
    assert "données/é.txt".encode() in m.canonical()
    assert Manifest.from_bytes(m.canonical()).id == m.id


def _mutate(path, value):
    def f(obj):
        target = obj
        for k in path[:-1]:
            target = target[k]
        if value is _DELETE:
            del target[path[-1]]
        else:
            target[path[-1]] = value
        return obj
    return f


_DELETE = object()
F0 = ("files", 0)
T0 = ("tensors", 0)


def _dup_path(obj):
    obj["files"][1]["path"] = "model.safetensors"
    return obj


def _file_and_folder(obj):
    obj["files"][1]["path"] = "model.safetensors/inner"
    return obj


def _folder_then_file(obj):
    obj["files"].append({"path": "sub", "size": 0, "mode": 0o644, "chunks": []})
    return obj


@pytest.mark.parametrize("change, error, needle", [
    (_mutate(F0 + ("path",), "/etc/passwd"), InvalidManifest, "relative"),
    (_mutate(F0 + ("path",), "../escape"), InvalidManifest, r"'\.\.'"),
    (_mutate(F0 + ("path",), "a/../../b"), InvalidManifest, r"'\.\.'"),
    (_mutate(F0 + ("path",), "a/./b"), InvalidManifest, "'.'"),
    (_mutate(F0 + ("path",), "a//b"), InvalidManifest, "empty"),
    (_mutate(F0 + ("path",), "a\\b"), InvalidManifest, "relative"),
    (_mutate(F0 + ("path",), "a\x00b"), InvalidManifest, "relative"),
    (_mutate(F0 + ("path",), ""), InvalidManifest, "non-empty"),
    (_mutate(F0 + ("path",), 7), InvalidManifest, "non-empty"),
    (_dup_path, InvalidManifest, "twice"),
    (_file_and_folder, InvalidManifest, "both a file and a folder"),
    (_folder_then_file, InvalidManifest, "both a file and a folder"),
    (_mutate(F0 + ("size",), 31), InvalidManifest, "add up to 30, not 31"),
    (_mutate(F0 + ("chunks",), [[A, 10], [B, 20], [C, 0]]), InvalidManifest, "empty chunk"),
    (_mutate(F0 + ("chunks",), [[A, 10], [B, 65 << 20]]), InvalidManifest, "chunk size"),
    (_mutate(F0 + ("chunks",), [[A, 10], [B.upper(), 20]]), InvalidChunkId, "chunk id"),
    (_mutate(F0 + ("chunks",), [[A, 10], ["sha256:" + "0" * 64, 20]]), InvalidChunkId, "chunk id"),
    (_mutate(F0 + ("chunks",), [[A, 10], [A[:-1], 20]]), InvalidChunkId, "chunk id"),
    (_mutate(F0 + ("chunks",), [[A, 10], [B, 20, 0]]), InvalidManifest, r"\[id, size\]"),
    (_mutate(F0 + ("chunks",), "nope"), InvalidManifest, "must be a list"),
    (_mutate(F0 + ("size",), -1), InvalidManifest, "size of"),
    (_mutate(F0 + ("size",), True), InvalidManifest, "size of"),
    (_mutate(F0 + ("mode",), 0o4755), InvalidManifest, "mode of"),
    (_mutate(("format",), "fabric.manifest/2"), InvalidManifest, "unknown manifest format"),
    (_mutate(("format",), _DELETE), InvalidManifest, "unknown manifest format"),
    (_mutate(("artifact",), "../etc"), InvalidName, "artifact"),
    (_mutate(("version",), ""), InvalidName, "version"),
    (_mutate(("parent",), "a/b"), InvalidName, "version"),
    (_mutate(("created",), 5), InvalidManifest, "created"),
    (_mutate(("files",), {}), InvalidManifest, "'files' must be a list"),
    (_mutate(("metadata",), []), InvalidManifest, "'metadata' must be an object"),
    (_mutate(T0 + ("length",), 21), InvalidManifest, "beyond the end"),
    (_mutate(T0 + ("offset",), 11), InvalidManifest, "beyond the end"),
    (_mutate(T0 + ("file",), "other.safetensors"), InvalidManifest, "unknown file"),
    (_mutate(T0 + ("dtype",), "F12"), InvalidManifest, "unknown dtype"),
    (_mutate(T0 + ("dtype",), ["F32"]), InvalidManifest, "unknown dtype"),
    (_mutate(T0 + ("shape",), [-5]), InvalidManifest, "dimension"),
    (_mutate(T0 + ("chunks",), ["nope"]), InvalidChunkId, "chunk id"),
    (_mutate(T0 + ("name",), None), InvalidManifest, "no name"),
])
def test_invalid_manifests_are_rejected(change, error, needle):
    obj = change(copy.deepcopy(_valid()))
    with pytest.raises(error, match=needle):
        Manifest.from_json(obj)


@pytest.mark.parametrize("data", [b"{", b"\xff", b"[]", b"null"])
def test_manifest_bytes_that_are_not_an_object(data):
    with pytest.raises(InvalidManifest):
        Manifest.from_bytes(data)


def test_validate_checks_manifests_built_in_memory():
    f = FileEntry("a.safetensors", 10, 0o644, ((A, 10),))
    t = TensorEntry("a.safetensors", "w", "F32", (4,), 8, 16, (A,))
    with pytest.raises(InvalidManifest, match="beyond the end"):
        Manifest("x", "v1", "now", (f,), (t,)).validate()
    with pytest.raises(InvalidManifest, match="twice"):
        Manifest("x", "v1", "now", (f, f)).validate()


@pytest.mark.parametrize("name", ["a", "Llama-3.1_8B", "v20260101.120000.000", "x" * 128])
def test_good_names(name):
    assert check_name("artifact", name) == name


@pytest.mark.parametrize("name", ["", ".hidden", "-x", "_x", "a/b", "a b", "x" * 129, "é", None, 3])
def test_bad_names(name):
    with pytest.raises(InvalidName, match="invalid artifact name") as e:
        check_name("artifact", name)
    assert isinstance(e.value, InvalidInput)


def test_check_path_accepts_nested_relative_paths():
    assert check_path("a/b/c.bin") == "a/b/c.bin"


def test_diff_names_changed_tensors_and_new_bytes():
    old = Manifest.from_json(_valid())
    obj = _valid()
    obj["version"] = "v3"
    obj["files"][0]["chunks"] = [[A, 10], [C, 20]]
    obj["tensors"][0]["chunks"] = [C]
    obj["tensors"].append({"file": "model.safetensors", "name": "h", "dtype": "U8", "shape": [10],
                           "offset": 0, "length": 10, "chunks": [A]})
    obj["files"][1] = {"path": "new.txt", "size": 10, "mode": 0o644, "chunks": [[A, 10]]}
    new = Manifest.from_json(obj)
    d = diff(old, new)
    assert d.files_added == ("new.txt",) and d.files_removed == ("sub/empty.txt",)
    assert d.files_changed == ("model.safetensors",)
    assert d.tensors_changed == ("model.safetensors:h", "model.safetensors:w")
    assert (d.new_chunks, d.new_bytes) == (1, 20)
    assert diff(None, old).new_bytes == 30 and diff(old, old).new_chunks == 0
    assert json.loads(json.dumps(d.to_json()))["files_added"] == ["new.txt"]
