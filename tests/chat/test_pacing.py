"""Pacing of a reply's text (`Generation.follow(interval=...)`, `EVERYTHING_STREAM_INTERVAL_MS`): one
message per tick of a clock shared by the process's streams, with every token that came meanwhile;
the first token and the end never wait."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime

from everything_server.chat.events import DELTA, DONE, START, USAGE, Event, Usage
from everything_server.chat.generation import Generation
from everything_server.chat.models import GENERATING, Message
from tests.support import Timed

INTERVAL = 0.5  # long against this machine's scheduling noise; the assertions keep wide margins
SLACK = 0.1  # how late a woken follower may run on a loaded machine


def generation() -> Generation:
    row = Message(
        id=uuid.uuid4(),
        thread_id=uuid.uuid4(),
        user_id=uuid.uuid4(),
        role="assistant",
        content="",
        status=GENERATING,
        turn=1,
        seq=1,
        created_at=datetime.now(UTC),
    )
    return Generation(row)


def follower(gen: Generation, interval: float) -> Timed:
    """A task following `gen`, noting each event with the loop time it came."""
    return Timed(gen.follow(0, interval))


async def just_after_a_tick() -> None:
    """Sleeps until a little after the next tick of the pacing clock (a multiple of INTERVAL)."""
    loop = asyncio.get_running_loop()
    await asyncio.sleep((loop.time() // INTERVAL + 1) * INTERVAL + 0.01 - loop.time())


def off_tick(when: float) -> float:
    """How long after a tick of the pacing clock `when` is."""
    return when % INTERVAL


async def test_tokens_within_an_interval_travel_together_and_the_first_is_not_held():
    gen, loop = generation(), asyncio.get_running_loop()
    f = follower(gen, INTERVAL)
    await f.until(1)
    assert f.got[0][1].kind == START

    await just_after_a_tick()
    t0 = loop.time()
    gen.emit(DELTA, text="a")
    await f.until(2)
    assert f.got[1][1] == Event(2, DELTA, text="a")
    assert f.got[1][0] - t0 < INTERVAL / 2, "the first token went out at once"

    for word in ("b", "c", "d"):  # all before the next tick
        await asyncio.sleep(0.02)
        gen.emit(DELTA, text=word)
    await f.until(3)
    when, ev = f.got[2]
    assert ev == Event(5, DELTA, text="bcd"), "one message, with the seq of its last token"
    assert when - t0 >= INTERVAL * 0.8, "held until the next tick"
    assert off_tick(when) < SLACK, "sent at a tick of the pacing clock"
    await asyncio.sleep(0.1)
    assert len(f.got) == 3

    f.task.cancel()


async def test_streams_whose_tokens_come_at_different_times_send_at_the_same_ticks():
    """Followers of replies that started apart wake together, at the shared clock's ticks: one
    wake-up of the loop for all their messages instead of one each."""
    loop = asyncio.get_running_loop()
    gens = [generation(), generation()]
    followers = [follower(g, INTERVAL) for g in gens]
    await just_after_a_tick()
    for g, f in zip(gens, followers, strict=True):
        g.emit(DELTA, text="first")  # sent at once, 0.15 s apart
        await f.until(2)
        await asyncio.sleep(0.15)
    for g in gens:
        g.emit(DELTA, text="second")  # waits for the next tick
    for f in followers:
        await f.until(3)
    (a, ev_a), (b, ev_b) = followers[0].got[2], followers[1].got[2]
    assert ev_a.text == ev_b.text == "second"
    assert abs(a - b) < SLACK, "both went out at the same tick"
    assert off_tick(a) < SLACK and off_tick(b) < SLACK
    assert a - followers[0].got[1][0] <= INTERVAL + SLACK, "never more than an interval apart"
    assert loop.time() - a < INTERVAL
    for f in followers:
        f.task.cancel()


async def test_the_end_of_a_reply_wakes_a_waiting_follower_at_once():
    gen, loop = generation(), asyncio.get_running_loop()
    f = follower(gen, INTERVAL)
    gen.emit(DELTA, text="a")
    await f.until(2)
    sent = loop.time()
    await asyncio.sleep(0.02)
    gen.emit(DELTA, text="b")  # waits for the interval...
    await asyncio.sleep(0.02)
    gen.emit(USAGE, usage=Usage(3, 2))  # ...until the reply ends
    gen.emit(DONE, status="completed")
    await asyncio.wait_for(f.task, 5)
    kinds = [(ev.kind, ev.text) for _, ev in f.got]
    assert kinds == [(START, ""), (DELTA, "a"), (DELTA, "b"), (USAGE, ""), (DONE, "")]
    assert f.got[-1][0] - sent < INTERVAL / 2, "done did not wait for the interval"


async def test_without_an_interval_every_token_is_its_own_message():
    gen = generation()
    f = follower(gen, 0.0)
    for word in ("a", "b", "c"):
        gen.emit(DELTA, text=word)
        await f.until(len(f.got) + 1)
    gen.emit(DONE, status="completed")
    await asyncio.wait_for(f.task, 5)
    assert [ev.text for _, ev in f.got if ev.kind == DELTA] == ["a", "b", "c"]


async def test_a_cancelled_follower_leaves_no_waiter_behind():
    gen = generation()
    f = follower(gen, INTERVAL)
    gen.emit(DELTA, text="a")
    await f.until(2)
    gen.emit(DELTA, text="b")
    await asyncio.sleep(0.05)  # the follower is pausing now
    assert gen._pacer.waiting == 1
    f.task.cancel()
    await asyncio.gather(f.task, return_exceptions=True)
    assert gen._pacer.waiting == 0
