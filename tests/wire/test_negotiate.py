"""Negotiation (fabric.wire.negotiate): the delta fields of a fetch request, the encodings
header, and manifests sent as patches against one the receiver holds."""

from __future__ import annotations

import pytest

from fabric.errors import BadFrame, InvalidInput, InvalidName, NotFound
from fabric.wire import chunks, negotiate, protocol

from helpers.versions import mem_store, origin_and_site_stores


@pytest.fixture
def origin_and_site():
    """An origin holding v1..v3 of `m`, a site holding v1 and v2 (both registries committed)."""
    return origin_and_site_stores()


def test_the_receiver_lists_what_it_holds_newest_first(origin_and_site):
    origin, site, (v1, v2, v3) = origin_and_site
    fields = negotiate.request_fields(site, v3)
    assert fields == {"artifact": "m", "version": "v3", "have": ["v2", "v1"],
                      "encodings": ["raw", "zstd", "bytegroup", "xor", "patch", "delta", "multipatch",
                                    "deltapack"]}
    assert negotiate.request_fields(site, v2)["have"] == ["v1"]
    assert negotiate.request_fields(mem_store(), v3)["have"] == []
    ids = list(v3.unique_chunks())
    assert negotiate.fetch_body(ids, None) == {"ids": ids}
    body = negotiate.fetch_body(ids, fields, standalone={ids[1], "blake3:" + "0" * 64})
    assert body["standalone"] == [ids[1]] and body["have"] == ["v2", "v1"]


@pytest.mark.parametrize("bad, error", [
    ({"encodings": "xor"}, InvalidInput), ({"encodings": [1]}, InvalidInput), ({"have": "v1"}, InvalidInput),
    ({"have": ["../x"]}, InvalidName), ({"artifact": None}, InvalidName), ({"standalone": "x"}, InvalidInput),
])
def test_malformed_delta_fields_are_refused(origin_and_site, bad, error):
    origin, site, (v1, v2, v3) = origin_and_site
    body = dict(negotiate.fetch_body(list(v3.unique_chunks()), negotiate.request_fields(site, v3)), **bad)
    with pytest.raises(error):
        chunks.plan_request(origin, body)


def test_manifest_patch_round_trip_and_refusals(origin_and_site):
    origin, site, (v1, v2, v3) = origin_and_site
    base = negotiate.manifest_base(site, "m", exclude="v3")
    assert base.version == "v2" and base.canonical == v2.canonical()
    body, ctype, headers = negotiate.serve_manifest(origin, "m", "v3", base.version)
    assert ctype == protocol.MANIFEST_PATCH and headers[protocol.BASE_HEADER] == v2.id
    assert len(body) < len(v3.canonical()) // 2
    assert negotiate.read_manifest_body(body, ctype, headers, base) == v3.canonical()
    # the server holds no such base, or none is offered: canonical JSON, as before
    for offered in (None, "v7", "v3"):
        plain, ctype2, headers2 = negotiate.serve_manifest(origin, "m", "v3", offered)
        assert ctype2 == "application/json" and plain == v3.canonical() and protocol.BASE_HEADER not in headers2
        assert negotiate.read_manifest_body(plain, ctype2, headers2, base) == v3.canonical()
    with pytest.raises(NotFound):
        negotiate.serve_manifest(origin, "m", "v9", "v1")
    with pytest.raises(BadFrame):  # a patch against a base the receiver did not offer
        negotiate.read_manifest_body(body, ctype, headers, negotiate.ManifestBase("v1", v1.id, v1.canonical()))
    with pytest.raises(BadFrame):
        negotiate.read_manifest_body(body[:-3], ctype, headers, base)
    with pytest.raises(BadFrame):
        negotiate.read_manifest_body(body, ctype, dict(headers, **{"X-Fabric-Manifest-Id": v2.id}), base)
    assert negotiate.manifest_base(mem_store(), "m") is None


def test_parse_encodings_header():
    assert negotiate.parse_encodings("raw,zstd,bytegroup,xor,patch,delta,multipatch,deltapack") == list(protocol.ENCODINGS)
    assert negotiate.parse_encodings("raw,zstd,bytegroup,xor,patch") == list(protocol.ENCODINGS)[:5]  # an older peer
    assert negotiate.parse_encodings(" raw , zstd,bytegroup,lz9") == ["raw", "zstd", "bytegroup"]
    assert negotiate.parse_encodings(None) == ["raw", "zstd"]
    assert negotiate.parse_encodings("bytegroup") == ["raw", "zstd"]  # an origin must decode raw and zstd
