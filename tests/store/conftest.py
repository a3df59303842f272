"""The store suite's backends: every test that takes `make_store` runs once per backend,
`local` (a folder in tmp_path) and `s3` (a fresh prefix in the bucket of the session's
one SeaweedFS, `suite_weed`; skipped only where the `weed` binary is absent)."""

from __future__ import annotations

import uuid

import pytest

from fabric.store import open_store
from helpers.s3 import SUITE_BUCKET


@pytest.fixture(params=["local", "s3"])
def kind(request):
    return request.param


@pytest.fixture
def make_store(kind, tmp_path, request):
    """Open (creating on first use) this test's store on the backend under test."""
    if kind == "local":
        return lambda **kw: open_store(tmp_path / "store", **kw)
    weed = request.getfixturevalue("suite_weed")
    url = f"s3://{SUITE_BUCKET}/{uuid.uuid4().hex[:12]}"
    return lambda **kw: open_store(url, s3=weed.options, **kw)
