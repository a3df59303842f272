"""fabric.store.chunk_index: lookups of unknown ids refresh the index, coalesced, and a
lookup the running refresh answers does not wait out `min_interval`."""

from __future__ import annotations

import asyncio
import time

from fabric.store.chunk_index import ChunkIndex


class Source:
    """Versions in memory; `version_keys` takes `delay` seconds, and runs `during` first."""

    def __init__(self, versions: dict[tuple[str, str], list[str]], delay: float = 0.0):
        self.versions, self.delay = versions, delay
        self.during = None  # called at the start of each listing (a publish landing meanwhile)

    async def version_keys(self):
        keys = set(self.versions)  # what the listing sees: taken before anything lands meanwhile
        if self.during is not None:
            self.during()
        await asyncio.sleep(self.delay)
        return keys

    async def chunk_ids(self, artifact, version):
        return self.versions[(artifact, version)]


def test_a_burst_of_lookups_for_a_version_the_running_refresh_learns_costs_one_refresh_and_no_wait():
    async def main():
        index = ChunkIndex(Source({("sim", "v1"): ["c1", "c2"]}, delay=0.05), min_interval=5.0)
        t0 = time.monotonic()
        first = asyncio.create_task(index.artifacts(["c1"]))
        await asyncio.sleep(0.01)  # the first lookup's refresh is listing now
        rest = [asyncio.create_task(index.artifacts(["c1", "c2"])) for _ in range(9)]
        answers = await asyncio.wait_for(asyncio.gather(first, *rest), timeout=2.0)  # not min_interval's 5 s
        return answers, index.refreshes, time.monotonic() - t0

    answers, refreshes, took = asyncio.run(main())
    assert answers[0] == {"c1": frozenset({"sim"})}
    assert all(a == {"c1": frozenset({"sim"}), "c2": frozenset({"sim"})} for a in answers[1:])
    assert refreshes == 1
    assert took < 1.0


def test_a_lookup_the_running_refresh_does_not_answer_waits_for_a_refresh_that_started_after_it_asked():
    async def main():
        source = Source({("sim", "v1"): ["c1"]}, delay=0.05)
        index = ChunkIndex(source, min_interval=0.2)
        source.during = lambda: source.versions.setdefault(("sim", "v2"), ["c9"])  # lands after the listing
        first = asyncio.create_task(index.artifacts(["c1"]))
        await asyncio.sleep(0.01)
        t_asked = time.monotonic()
        second = await asyncio.wait_for(index.artifacts(["c9"]), timeout=2.0)
        return await first, second, index.refreshes, time.monotonic() - t_asked

    first, second, refreshes, waited = asyncio.run(main())
    assert first == {"c1": frozenset({"sim"})}
    assert second == {"c9": frozenset({"sim"})}  # found by the second refresh, not the first
    assert refreshes == 2
    assert waited >= 0.15  # the second refresh kept min_interval after the first started


def test_an_id_no_version_references_stays_unknown_after_one_refresh():
    async def main():
        index = ChunkIndex(Source({("sim", "v1"): ["c1"]}), min_interval=0.0)
        return await index.artifacts(["c1", "nope"]), index.refreshes

    answer, refreshes = asyncio.run(main())
    assert answer == {"c1": frozenset({"sim"}), "nope": frozenset()}
    assert refreshes == 1
