"""Relayed site reports (fabric/wire/site_reports.py): what a body may carry, and how a relay splits them."""

from __future__ import annotations

import json

import pytest

from fabric.errors import InvalidInput
from fabric.wire.site_reports import report_bodies, split_report


def test_split_keeps_the_senders_own_report_apart_from_the_relayed_ones():
    own, relayed = split_report({"ready": True, "relayed": [{"site": "e1", "via": ["m1"], "age_s": 1.5, "ready": False}]})
    assert own == {"ready": True}
    assert [(r.site, r.via, r.age_s, r.report) for r in relayed] == [("e1", ["m1"], 1.5, {"ready": False})]
    own, relayed = split_report({"relayed_only": True, "relayed": []})
    assert own is None and relayed == []


@pytest.mark.parametrize("bad", [
    {"relayed": {"site": "e1"}}, {"relayed": ["e1"]}, {"relayed": [{"via": []}]}, {"relayed": [{"site": "../x"}]},
    {"relayed": [{"site": "e1", "via": ["m"] * 33}]}, {"relayed": [{"site": "e1", "via": [3]}]},
    {"relayed": [{"site": "e1", "age_s": -1}]}, {"relayed": [{"site": "e1", "age_s": True}]},
    {"relayed": [{"site": "e1", "age_s": 1e9}]}, {"relayed_only": "yes"},
])
def test_split_refuses_malformed_relayed_entries(bad):
    with pytest.raises(InvalidInput):
        split_report(bad)


def test_bodies_stay_within_the_limit_and_carry_every_entry_once():
    entries = [{"site": f"e{i:03d}", "via": [], "age_s": 0.1, "note": "x" * 900} for i in range(300)]
    bodies = report_bodies({"ready": True}, entries, limit=64 << 10)
    assert len(bodies) > 1 and all(len(json.dumps(b)) <= 64 << 10 for b in bodies)
    assert bodies[0]["ready"] is True and all(b.get("relayed_only") is True for b in bodies[1:])
    sent = [e["site"] for b in bodies for e in b["relayed"]]
    assert sent == [e["site"] for e in entries]
    too_big = {"site": "huge", "via": [], "age_s": 0, "note": "y" * (70 << 10)}
    assert "relayed" not in report_bodies({"ready": True}, [too_big], limit=64 << 10)[0]
