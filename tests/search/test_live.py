"""A running search's event log (`LiveSearch.watch`): summary deltas ready together go out as one,
paced on the process's shared clock like a chat reply's text; the first delta and the end never
wait; each watcher's seq counts 1, 2, 3, ..."""

from __future__ import annotations

import asyncio
import uuid

from everything_server.search.live import LiveSearch
from everything_server.search.models import (
    Completed,
    Event,
    SearchUsage,
    Started,
    SummaryDelta,
    UsageReported,
)
from tests.support import Timed

INTERVAL = 0.5  # long against this machine's scheduling noise; the assertions keep wide margins
SLACK = 0.1  # how late a woken watcher may run on a loaded machine


def watcher(live: LiveSearch, interval: float) -> Timed:
    """A task watching `live`, noting each event with the loop time it came."""
    return Timed(live.watch(interval))


def started() -> Started:
    # Started carries the search's row; the log does not look into it.
    return Started(search=None)  # type: ignore[arg-type]


async def just_after_a_tick() -> None:
    loop = asyncio.get_running_loop()
    await asyncio.sleep((loop.time() // INTERVAL + 1) * INTERVAL + 0.01 - loop.time())


async def test_deltas_ready_together_go_out_as_one_and_seq_counts_the_messages_sent():
    live = LiveSearch(uuid.uuid4())
    live.emit(started())
    for word in ("a", "b", "c"):
        live.emit(SummaryDelta(word))
    live.emit(UsageReported(SearchUsage(1, 3, False)))
    live.emit(Completed(search=None))  # type: ignore[arg-type]
    live.end()
    got = [ev async for ev in live.watch()]
    assert [type(ev.body) for ev in got] == [Started, SummaryDelta, UsageReported, Completed]
    assert got[1].body == SummaryDelta("abc")
    assert [ev.seq for ev in got] == [1, 2, 3, 4]
    assert {ev.search_id for ev in got} == {live.search_id}


async def test_a_summary_is_paced_on_the_shared_clock_and_the_first_delta_is_not_held():
    live, loop = LiveSearch(uuid.uuid4()), asyncio.get_running_loop()
    live.emit(started())
    w = watcher(live, INTERVAL)
    await w.until(1)

    await just_after_a_tick()
    t0 = loop.time()
    live.emit(SummaryDelta("a"))
    await w.until(2)
    assert w.got[1][0] - t0 < INTERVAL / 2, "the first delta went out at once"

    for word in ("b", "c", "d"):  # all before the next tick
        await asyncio.sleep(0.02)
        live.emit(SummaryDelta(word))
    await w.until(3)
    when, ev = w.got[2]
    assert ev.body == SummaryDelta("bcd") and ev.seq == 3
    assert when - t0 > INTERVAL / 2, "the rest waited for the tick"
    assert when % INTERVAL < SLACK, "and went out on it"
    live.end()
    await asyncio.wait_for(w.task, 5)


async def test_the_end_of_a_search_wakes_a_waiting_watcher_at_once():
    live, loop = LiveSearch(uuid.uuid4()), asyncio.get_running_loop()
    live.emit(started())
    w = watcher(live, INTERVAL)
    await just_after_a_tick()
    live.emit(SummaryDelta("a"))
    await w.until(2)
    await asyncio.sleep(0.02)
    assert live._pacer.waiting == 1  # the watcher waits for the tick
    live.emit(SummaryDelta("b"))
    t0 = loop.time()
    live.emit(UsageReported(SearchUsage(1, 2, False)))
    await w.until(4)
    assert w.got[2][1].body == SummaryDelta("b") and isinstance(w.got[3][1].body, UsageReported)
    assert w.got[2][0] - t0 < INTERVAL / 2, "the usage did not wait for the tick, nor the text before it"
    live.end()
    await asyncio.wait_for(w.task, 5)
    assert live._pacer.waiting == 0


async def test_a_watcher_that_comes_late_reads_everything_and_a_failure_reaches_it():
    live = LiveSearch(uuid.uuid4())
    live.emit(started())
    live.emit(SummaryDelta("x"))
    live.end(RuntimeError("the model failed"))
    got: list[Event] = []
    try:
        async for ev in live.watch(INTERVAL):
            got.append(ev)
    except RuntimeError as err:
        assert str(err) == "the model failed"
    else:
        raise AssertionError("the failure was not raised")
    assert [ev.body for ev in got][1:] == [SummaryDelta("x")]
