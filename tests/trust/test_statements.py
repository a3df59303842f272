"""fabric/trust/statements.py: the three statement kinds, strict parsing, times, the next channel move."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fabric.errors import StatementMalformed
from fabric.trust import ChannelStatement, DelegationsStatement, VersionStatement, next_channel_statement
from fabric.trust.statements import Rule, format_time, parse_statement, parse_time
from helpers.trust import MANIFEST_A, seed_key

T = 1796180000  # 2026-12-02T02:53:20Z
K1, K2 = seed_key(1), seed_key(2)


def _channel(**kw) -> dict:
    s = ChannelStatement("llama3", "prod", "v1", MANIFEST_A, "promote", 3, T + 60, T).to_json()
    s.update(kw)
    return s


def test_times_are_rfc_3339_utc_to_the_second():
    assert format_time(T) == "2026-12-02T02:53:20Z"
    assert parse_time("2026-12-02T02:53:20Z", "t") == T
    for bad in ("2026-12-02T03:33:20+00:00", "2026-12-02T03:33:20.5Z", "2026-12-02 03:33:20Z",
                "2026-02-30T00:00:00Z", "2026-12-02T24:00:00Z", 1796180000):
        with pytest.raises(StatementMalformed):
            parse_time(bad, "t")


def test_each_kind_round_trips_and_parse_statement_dispatches_on_type():
    v = VersionStatement("llama3", "v1", MANIFEST_A, T)
    c = ChannelStatement.from_json(_channel())
    d = DelegationsStatement(1, T + 60, {K1.keyid: K1.public}, (Rule(("llama*",), ("*",), (K1.keyid,), 1),),
                             (K2.keyid,))
    for stmt in (v, c, d):
        assert parse_statement(stmt.to_json()) == stmt
    assert v.to_json() == {"_type": "fabric.version/v1", "artifact": "llama3", "version": "v1",
                           "manifest": MANIFEST_A, "signed_at": "2026-12-02T02:53:20Z"}
    assert c.sequence == 3 and c.expires == T + 60
    with pytest.raises(StatementMalformed, match="_type"):
        parse_statement({"_type": "fabric.other/v1"})


CHANNEL_BAD = {
    "missing field": lambda s: s.pop("expires"),
    "unknown field": lambda s: s.update(note="x"),
    "sequence zero": lambda s: s.update(sequence=0),
    "sequence a string": lambda s: s.update(sequence="3"),
    "sequence a bool": lambda s: s.update(sequence=True),
    "action": lambda s: s.update(action="delete"),
    "manifest id": lambda s: s.update(manifest="sha256:" + "a" * 64),
    "manifest uppercase": lambda s: s.update(manifest="blake3:" + "A" * 64),
    "artifact name": lambda s: s.update(artifact="../etc"),
    "channel name": lambda s: s.update(channel=""),
    "expires": lambda s: s.update(expires="tomorrow"),
    "type of the other kind": lambda s: s.update(_type="fabric.version/v1"),
}


@pytest.mark.parametrize("case", sorted(CHANNEL_BAD))
def test_channel_statements_are_parsed_strictly(case):
    s = _channel()
    CHANNEL_BAD[case](s)
    with pytest.raises(StatementMalformed):
        parse_statement(s)


def _delegations(**kw) -> dict:
    d = DelegationsStatement(2, T + 60, {K1.keyid: K1.public},
                             (Rule(("llama*",), ("*",), (K1.keyid,), 1),), ()).to_json()
    d.update(kw)
    return d


@pytest.mark.parametrize("change", [
    lambda d: d["keys"].update({K2.keyid: {"public": K1.public.b64}}),  # keyid of another key
    lambda d: d["keys"].update({K2.keyid: {"public": "AAAA"}}),
    lambda d: d["rules"][0].update(keys=[K2.keyid]),  # a rule key the statement does not list
    lambda d: d["rules"][0].update(threshold=2),  # more than the rule's keys
    lambda d: d["rules"][0].update(artifacts=[]),
    lambda d: d["rules"][0].pop("channels"),
    lambda d: d.update(revoked=["nope"]),
    lambda d: d.update(version=0),
])
def test_delegations_are_parsed_strictly(change):
    d = _delegations()
    change(d)
    with pytest.raises(StatementMalformed):
        DelegationsStatement.from_json(d)


def test_next_channel_statement_is_the_previous_sequence_plus_one_and_expires_later():
    s = next_channel_statement("llama3", "prod", "v2", MANIFEST_A, "rollback", 41, 7 * 86400, now=T)
    assert (s.sequence, s.action, s.signed_at, s.expires) == (42, "rollback", T, T + 7 * 86400)
    with pytest.raises(StatementMalformed):
        next_channel_statement("llama3", "prod", "v2", MANIFEST_A, "sideways", 0, 60)


_ANY = st.recursive(st.none() | st.booleans() | st.integers(-2, 2 ** 60) | st.floats(allow_nan=False) |
                    st.text(max_size=70) | st.sampled_from([K1.keyid, K1.public.b64, MANIFEST_A, "2026-12-02T02:53:20Z",
                                                            "fabric.delegations/v1", "llama*"]),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
                        st.sampled_from(["public", "artifacts", "channels", "keys", "threshold", K1.keyid, "x"]),
                        inner, max_size=4), max_leaves=12)


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.sampled_from(["version", "channel", "delegations"]), st.data())
def test_any_field_value_is_parsed_or_refused_as_malformed_never_crashes(kind, data):
    good = {"version": VersionStatement("llama3", "v1", MANIFEST_A, T).to_json(), "channel": _channel(),
            "delegations": _delegations()}[kind]
    field = data.draw(st.sampled_from(sorted(good)))
    good[field] = data.draw(_ANY)
    try:
        stmt = parse_statement(good)
    except StatementMalformed:
        return
    assert stmt.to_json() == good  # what parses is exactly what was written
