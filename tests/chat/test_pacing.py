"""Pacing of a reply's text (`Generation.follow(interval=...)`, `EVERYTHING_STREAM_INTERVAL_MS`): one
message per interval with every token that came meanwhile; the first token and the end never wait."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime

from everything_server.chat.events import DELTA, DONE, START, USAGE, Event, Usage
from everything_server.chat.generation import Generation
from everything_server.chat.models import GENERATING, Message

INTERVAL = 0.5  # long against this machine's scheduling noise; the assertions keep wide margins


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


class Follower:
    """A task following `gen`, noting each event with the loop time it came."""

    def __init__(self, gen: Generation, interval: float):
        self.got: list[tuple[float, Event]] = []
        self.loop = asyncio.get_running_loop()
        self.task = asyncio.create_task(self._run(gen, interval))

    async def _run(self, gen: Generation, interval: float) -> None:
        async for ev in gen.follow(0, interval):
            self.got.append((self.loop.time(), ev))

    async def until(self, n: int, timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout):
            while len(self.got) < n:
                await asyncio.sleep(0.005)


async def test_tokens_within_an_interval_travel_together_and_the_first_is_not_held():
    gen, loop = generation(), asyncio.get_running_loop()
    f = Follower(gen, INTERVAL)
    await f.until(1)
    assert f.got[0][1].kind == START

    t0 = loop.time()
    gen.emit(DELTA, text="a")
    await f.until(2)
    assert f.got[1][1] == Event(2, DELTA, text="a")
    assert f.got[1][0] - t0 < INTERVAL / 2, "the first token went out at once"

    for word in ("b", "c", "d"):  # all within the interval after "a"
        await asyncio.sleep(0.02)
        gen.emit(DELTA, text=word)
    await f.until(3)
    when, ev = f.got[2]
    assert ev == Event(5, DELTA, text="bcd"), "one message, with the seq of its last token"
    assert when - f.got[1][0] >= INTERVAL * 0.9, "held until the interval after the last message"
    await asyncio.sleep(0.1)
    assert len(f.got) == 3

    f.task.cancel()


async def test_the_end_of_a_reply_wakes_a_waiting_follower_at_once():
    gen, loop = generation(), asyncio.get_running_loop()
    f = Follower(gen, INTERVAL)
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
    f = Follower(gen, 0.0)
    for word in ("a", "b", "c"):
        gen.emit(DELTA, text=word)
        await f.until(len(f.got) + 1)
    gen.emit(DONE, status="completed")
    await asyncio.wait_for(f.task, 5)
    assert [ev.text for _, ev in f.got if ev.kind == DELTA] == ["a", "b", "c"]


async def test_a_cancelled_follower_leaves_no_waiter_behind():
    gen = generation()
    f = Follower(gen, INTERVAL)
    gen.emit(DELTA, text="a")
    await f.until(2)
    gen.emit(DELTA, text="b")
    await asyncio.sleep(0.05)  # the follower is pausing now
    assert len(gen._pausing) == 1
    f.task.cancel()
    await asyncio.gather(f.task, return_exceptions=True)
    assert not gen._pausing
