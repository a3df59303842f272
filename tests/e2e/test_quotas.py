"""What a client can make a `fabric origin` keep is bounded (issue 13), with real processes.

A publisher cannot upload without bound chunks no version names (`--upload-quota`,
507 `quota_exceeded`); the chunks it left behind are collected after `--orphan-grace`
by the origin's own sweep, while committed versions stay whole; a site report is at
most 256 KiB (413) and all of them together at most 64 MiB (507).
"""

from __future__ import annotations

import json
import time

from fabric.fsck import fsck
from fabric.origin.quotas import REPORT_MAX, REPORTS_TOTAL
from fabric.store import open_store

from helpers.files import random_bytes, write_tree
from helpers.http import request
from helpers.origin import ADMIN_SECRET, PUBLISH_SECRET, OriginProcess, fabric_json, write_token_file
from helpers.store import chunk_count


def _origin(tmp_path, *args) -> OriginProcess:
    tokens = write_token_file(tmp_path / "tokens.toml")
    return OriginProcess(tmp_path / "origin-store", tokens, tmp_path / "origin.log", args=list(args)).start()


def _publish(origin, src, version, expect_rc=0) -> dict:
    return fabric_json("publish", src, "--artifact", "m", "--version", version, "--origin", origin.url,
                       "--token", PUBLISH_SECRET, expect_rc=expect_rc)


def test_uploads_no_version_names_are_bounded_per_token_and_collected_after_their_grace(tmp_path, rng):
    small = write_tree(tmp_path / "small", {"w.bin": random_bytes(rng, 100_000)})
    large = write_tree(tmp_path / "large", {"w.bin": random_bytes(rng, 2_000_000)})
    with _origin(tmp_path, "--upload-quota", "600k", "--orphan-grace", "2s", "--orphan-interval", "500ms") as o:
        assert _publish(o, small, "v1")["version"] == "v1"  # within the quota; the commit settles it
        refused = _publish(o, large, "v2", expect_rc=1)
        assert refused["error"]["code"] == "quota_exceeded", refused
        assert o.counter('fabric_origin_quota_refusals_total{limit="upload_quota"}') == 1
        store = open_store(tmp_path / "origin-store", create=False)
        committed = chunk_count(tmp_path / "origin-store")
        assert committed > 2  # v1's chunks and the orphans the refused publish left
        deadline = time.monotonic() + 30
        while o.counter("fabric_origin_orphan_chunks_deleted_total") == 0 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert o.counter("fabric_origin_orphan_chunks_deleted_total") > 0, o.log_text()[-2000:]
        report = fsck(store)
        assert report.ok and report.versions == 1
        v1 = fabric_json("show", "m@v1", "--origin", o.url, "--token", PUBLISH_SECRET)
        held = {cid for f in v1["files"] for cid, _ in f["chunks"]} if "files" in v1 else None
        assert held is None or all(store.has_chunk(c) for c in held)
        assert chunk_count(tmp_path / "origin-store") < committed
        # their charge lapsed with their grace: the same token may upload again
        assert _publish(o, small, "v1")["version"] == "v1"


def test_site_reports_are_bounded_in_size_and_in_total(tmp_path):
    with _origin(tmp_path, "--orphan-interval", "0") as o:
        big = {"pad": "x" * (REPORT_MAX + 1)}
        r = request(o.url, "POST", "/v1/sites/fra", big, token=ADMIN_SECRET)
        assert r.status == 413 and r.error()["code"] == "payload_too_large"
        small = {"ok": 1}
        assert request(o.url, "POST", "/v1/sites/fra", small, token=ADMIN_SECRET).status == 200
        fill = {"pad": "x" * (REPORT_MAX - 100)}
        n = (REPORTS_TOTAL - len(json.dumps(small))) // len(json.dumps(fill))  # this many fit beside it
        for i in range(n):
            assert request(o.url, "POST", f"/v1/sites/s{i}", fill, token=ADMIN_SECRET).status == 200
        r = request(o.url, "POST", f"/v1/sites/s{n + 1}", fill, token=ADMIN_SECRET)
        assert r.status == 507 and r.error()["code"] == "quota_exceeded", r
        assert request(o.url, "POST", "/v1/sites/s0", {"small": 1}, token=ADMIN_SECRET).status == 200  # replaces
        assert request(o.url, "POST", f"/v1/sites/s{n + 1}", fill, token=ADMIN_SECRET).status == 200
        assert o.counter('fabric_origin_quota_refusals_total{limit="report_size"}') == 1
        assert o.counter('fabric_origin_quota_refusals_total{limit="reports_total"}') == 1
