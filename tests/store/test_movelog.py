"""fabric.store.movelog and fabric.store.reports on every backend (a local folder and a real
SeaweedFS bucket): numbered entries without holes under concurrent writers, readers that
resume after a cursor and learn of a gap, pruning, and stored site reports."""

from __future__ import annotations

import threading

from fabric.store import movelog, reports
from fabric.store.movelog import KEEP, MoveLog, entry_key


def test_concurrent_writers_take_every_number_once(make_store):
    store = make_store()
    logs = [MoveLog(store, f"origin-{i}") for i in range(3)]
    got: list[list[int]] = [[] for _ in logs]

    def write(i: int) -> None:
        for n in range(8):
            got[i].append(logs[i].append({"type": "channel", "artifact": "m", "channel": "prod",
                                          "version": f"v{i}-{n}", "action": "promote"}))
    threads = [threading.Thread(target=write, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(sum(got, [])) == list(range(1, 25))  # no number twice, no hole
    reader = MoveLog(store, "reader")
    entries, gap = reader.read_after(0)
    assert [e.seq for e in entries] == list(range(1, 25)) and not gap
    assert {e.origin for e in entries} == {"origin-0", "origin-1", "origin-2"}
    assert entries[0].event["type"] == "channel" and "seq" not in entries[0].event
    tail, gap = reader.read_after(20)
    assert [e.seq for e in tail] == [21, 22, 23, 24] and not gap
    assert reader.read_after(24) == ([], False)
    assert reader.head() == 24


def test_a_reader_behind_the_pruned_entries_is_told_of_the_gap(make_store):
    store = make_store()
    log = MoveLog(store, "a")
    for seq in (1, 2, 3):
        store.backend.put(entry_key(seq), b'{"seq": 0, "origin": "x", "at": 0, "event": {"type": "version"}}')
    log.append({"type": "version", "artifact": "m", "version": "v1", "manifest_id": "blake3:00"})
    store.backend.delete(entry_key(2))  # as a writer's pruning would
    entries, gap = MoveLog(store, "b").read_after(1)
    assert [e.seq for e in entries] == [3, 4] and gap
    assert entries[-1].event["version"] == "v1" and entries[-1].origin == "a"
    store.backend.put(entry_key(5), b"not json")
    bad, _ = MoveLog(store, "b").read_after(4)
    assert [(e.seq, e.event) for e in bad] == [(5, None)]  # unreadable: skipped by the reader, never fatal


def test_a_writer_prunes_what_is_keep_behind(make_store):
    store = make_store()
    store.backend.put(entry_key(KEEP), b"{}")  # the log's head, as if KEEP moves had been made
    store.backend.put(entry_key(1), b"{}")
    seq = MoveLog(store, "a").append({"type": "version", "artifact": "m", "version": "v", "manifest_id": "x"})
    assert seq == KEEP + 1
    assert not store.backend.has(entry_key(1))
    assert sorted(i.key for i in store.backend.list(movelog.PREFIX)) == [entry_key(KEEP), entry_key(KEEP + 1)]


def test_site_reports_are_kept_and_read_back(make_store):
    store = make_store()
    report = {"site": "fra", "received": 1795739119.5, "ready": True, "channels": []}
    reports.put_report(store, "fra", report)
    reports.put_report(store, "ams", dict(report, site="ams"))
    store.backend.put(reports.PREFIX + "bad name!.json", b"{}")
    store.backend.put(reports.report_key("lies"), b'{"site": "other", "received": 1}')
    assert sorted(s for s, _ in reports.listed(store)) == ["ams", "fra", "lies"]
    assert reports.get_report(store, "fra") == report
    assert reports.get_report(store, "lies") is None  # names another site
    assert reports.get_report(store, "absent") is None
    reports.delete_report(store, "fra")
    assert reports.get_report(store, "fra") is None
