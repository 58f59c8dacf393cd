"""Admission control: past capacity a new stream is refused at once, never queued.

New server-streaming calls are refused with RESOURCE_EXHAUSTED (reason SERVER_OVERLOADED, with a
RetryInfo) while

- the process holds `max_streams_per_process` open streams (a memory bound, cause `streams`), or
- `max_starting_streams` admitted streams have not sent their first message yet (cause `starting`):
  their setup (the user's message saved, the model asked) is the costly part of a stream, and past
  capacity it is what piles up, or
- the oldest caller waiting for a pooled database connection has waited `max_db_wait_seconds`
  (cause `database`, `db.PoolQueue`): with every connection busy that long, each new stream only
  lengthens a queue that ends in the pool's timeout, or
- the process holds as many streams as its adaptive limit (`StreamAdmission`, cause `load`), when
  one is configured (`admission_target_load` > 0; off by default, see below): lowered while the
  event loop's load (the share of wall time it is not waiting for I/O: running callbacks, or
  runnable and waiting for a CPU) stays above the target, raised back while it is below, never
  above the configured cap nor below a small floor, or
- the event loop is late beyond `max_loop_lag_seconds` (an emergency brake for stalls, cause
  `loop_lag`): `LoopLagMonitor` wakes every `interval` seconds and measures how much later than
  asked `asyncio.sleep` came back.

None of these can refuse a call that no code of ours has seen. Until 2026-12-04 that was where
calls waited past capacity: grpc.aio took them from grpc core slowly (see `rpc/acceptors.py`, which
fixes that, and the history below). Measured on 2026-12-04 (2 cores, a slow day: the mock alone
gave first tokens at p50 9.3 s at 1,000 streams; machine PostgreSQL), 1,000 streams at 50 tokens/s
with these defaults: 0 errors, 1,792 refusals in 47 ms (p50; p99 0.27 s), admitted first tokens at
p50 0.38 s (p99 1.5 s), 6.6k tokens/s. Without the database cause 113 streams ended UNAVAILABLE
after the pool's 10 s timeout (first tokens at p50 4.7 s). The burst of 1,000 cheap streams opened
within 5 s was past capacity that day too (their setup, about 10 ms of CPU each, kept the loop's
load at 0.99 for the whole ramp and the database wait at 1.4 s on average): without the database
cause all but 70 were admitted and served, with first tokens at p99 6.2 s; with it 924 were open
together (the others still waiting out their RetryInfo when the benchmark's window closed), first
tokens at p99 0.83 s. A wait of 1 s instead of 250 ms changed little there (574 against 650-816
refusals, refused clients not asking again); a pool of 40 connections instead of 20 refused about a
quarter fewer.

History. Why past capacity new calls waited instead of being refused (measured on 2 cores, 1,000
offered streams at 50 tokens/s, one process, before `rpc/acceptors.py`): about 150-180 streams were
open and the other calls waited in grpc core, where no code of ours sees them, refusals included.
`CallBacklog` counts them (channelz's calls started minus the calls our interceptors saw): about 900
waited there through the run, and only about 50 a second were taken, the rate streams ended.
grpc.aio takes one call of a method at a time from grpc core, each a few event loop iterations away
from the last: a health check on the same process meanwhile answered in 20-190 ms. Three more
grpc.aio servers on the same port in the process did not shorten the wait; holding fewer streams
did. So the adaptive limit keeps the process below saturation: at a target load of 0.85, refusals
came back in 16-128 ms (p50; p99 0.23-0.58 s) and admitted streams got their first token in 24-48 ms
(p50) instead of 0.4-1.5 s (3.5 s in one run). The price, measured in the same runs: fewer tokens/s
at that load (4.6-5.6k instead of 7.4-8.9k); a burst of cheap streams right after (1,000 at 2
tokens/s opened within 5 s) had 337-450 refused, because the load of their setup alone crosses the
target although the process serves them all in time without the limit; and behind Envoy with two
replicas on the same 2 cores, tokens/s fell to 2.7k (from 15k) with refusals still at 0.46 s (p50).
So it is off by default: a deployment that prefers refusals to slow first tokens turns it on.
Steering the limit by the backlog's own wait instead (lower it while the oldest waiting call has
waited more than 0.25, 0.5 or 1 s) was tried and left out: a refusal still comes only after that
wait (p50 0.33 s at 0.25 s), and the burst above had 565-656 of its streams refused, because its
calls do wait that long (first tokens at p99 1 s without any limit). A self-probe of SendMessage's
own wait did no better. What would answer at once is grpc core refusing before the call is queued,
or (found on 2026-12-04) grpc.aio taking its calls at once: `rpc/acceptors.py`.

Tried on 2026-12-02 (2 cores, 1,000 streams at 50 tokens/s) and left out:
- grpc core does have such a limit (the private channel arguments `grpc.server.max_pending_requests`
  and `..._hard_limit`, 1,000 and 3,000 by default, per method), but the calls it refuses end
  CANCELLED (a reset stream), with no RetryInfo: at 32 and 64 the bench's clients, which call again
  at once after an error, made 219,000 calls in 15 s and tokens/s fell from 11.6k to 5.9k.
- More calls of a method taken from grpc core at once (16 more `_request_registered_call`s of
  grpc.aio's server, a private API): under a saturated loop first answers came at p50 0.2 s instead
  of 4.2 s, then the server stalled for good in the same test (calls taken, handlers never run).
  That stall was grpc.aio's poller thread blocked on its full wake-up socket (found on 2026-12-04):
  with the wake-ups drained too, `rpc/acceptors.py` does this, by default.
- Steering the limit by the loop's lag instead of its load: at 20 ms refusals came back after 1.9 s
  (p50), since calls wait in grpc core for seconds while the smoothed lag of a saturated loop stays
  under 40 ms (at 40 ms nothing was refused).

Tried on 2026-12-03, on a machine about half as fast (the mock alone gave first tokens at p50 19 s
at 1,000 streams), and left out: steering the limit by the loop thread's CPU share instead of its
load, so that CPU taken by other processes would not lower it. Nothing was refused, and 467 calls
ended CANCELLED after 30 s: the longest grpc core keeps a call no code has taken
(`grpc.server_max_unrequested_time_in_server`, 30 s by default), which is also where the default
server's errors come from at that load (116 in the same hour). The load-steered limit itself did
badly there: 2.6k tokens/s against 4.8k without it, and 961 of the 1,000 cheap streams of the
burst refused; with the server on a CPU of its own (the benchmark's `--server-cpus`), 3.3k against
11.3k and 935 refused (3.2k against 8.5k and 912 with the database on the other CPU). A loop with
fewer streams spends more per token (0.29 against 0.11 CPU s per 1,000 there), so its load stays
high while it refuses. So it stays off by default.

Streams already admitted run on; unary calls (short, and how clients see an overloaded server's
state) and health checks are never refused by this. The lag is smoothed (an exponentially weighted
mean of samples capped at 250 ms) so that one long pause does not refuse calls for long, while
lateness that lasts crosses the threshold within a few samples.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import random
import selectors
import time
import weakref

log = logging.getLogger(__name__)

# Wake up often enough to see an overload within about half a second.
LAG_INTERVAL_SECONDS = 0.05
# Weight of the newest sample in the smoothed lag (about the last 5 samples count).
LAG_SMOOTHING = 0.2
# One sample counts at most this much: a single long pause (a slow garbage collection, a blocking
# call, a process that was stopped) must not refuse streams for long; lateness that lasts does.
LAG_SAMPLE_CAP_SECONDS = 0.25
BUSY_SMOOTHING = 0.1
# The load is smoothed over about the last 5 samples (a quarter of a second).
LOAD_SMOOTHING = 0.2

# The load a StreamAdmission aims for when turned on without a target of its own: on 2 cores, 0.85
# gave the fastest refusals for the throughput lost (0.8: slower first tokens and less throughput;
# 0.9: refusals at p50 65 ms). A saturated loop reads 0.95-0.98.
TARGET_LOAD = 0.85
# Above target + band the limit comes down; below target - band it may go up.
LOAD_BAND = 0.05
# The limit never goes below this many streams (however loaded the loop is by other work).
MIN_STREAM_LIMIT = 8
# Coming down: to 90% of the streams open now, at most every quarter second (streams end slowly,
# and the load needs a few samples to show the last step).
DECREASE_FACTOR = 0.9
DECREASE_EVERY_SECONDS = 0.25
# Going up, while the limit is what keeps streams out: per sample, by a share that grows with the
# room left (1% just under the band, at most 10% on an idle loop; at least 1 stream), so that a limit
# lowered by an overload is back within a second or two once the load is gone.
INCREASE_SHARE = 0.2
INCREASE_MAX = 0.1
# RetryInfo of a refusal: 1-2 s while refusals are rare; past this many refusals a second, the delay
# grows with their rate (a base of up to RETRY_AFTER_MAX_SECONDS, spread over base to twice the
# base, so that refused clients do not come back together), so that clients honouring
# it come back at a rate the process answers without effort (a refusal costs about 0.4 ms of CPU).
REFUSALS_PER_SECOND = 25.0
RETRY_AFTER_MAX_SECONDS = 10.0
# What one refusal costs the loop (accepting the call, the status, the abort, the access log line;
# measured on 2 cores with every new stream refused). The limit is steered by the load without the
# refusals' share: fewer streams would not make refusing cheaper; the growing RetryInfo does.
REFUSAL_COST_SECONDS = 0.0004


# Calls waiting in grpc core (`CallBacklog`). At or below this load, calls cannot be waiting for the
# loop: what is left of the count after this many such samples in a row (2.5 s at the monitor's
# pace) is calls that were cancelled while they waited, which grpc core forgets without counting
# them as finished.
QUIET_LOAD = 0.6
QUIET_SAMPLES = 5
# How far back the arrival times of waiting calls are kept (a longer wait reads as this long).
BACKLOG_HISTORY_SECONDS = 30.0
# The backlog is read with every this many load samples (twice a second at the default interval):
# channelz's answer is built under grpc core's locks with the GIL held, measured at about 0.9 ms a
# read under 16 streams, which at every sample (20 a second) was 8% of the process's CPU. Its only
# readers are gauges, and a wait known to half a second is precise enough for them.
BACKLOG_EVERY_SAMPLES = 10

# Every call the process's interceptors have seen (all servers of the process: channelz counts them
# all).
_calls_seen = 0


def saw_call() -> None:
    """An interceptor saw a new call (counted before anything else, whatever becomes of it)."""
    global _calls_seen
    _calls_seen += 1


def calls_seen() -> int:
    """How many calls the process's interceptors have seen (`saw_call`)."""
    return _calls_seen


def core_calls_started() -> int | None:
    """Calls grpc core has started on all servers of this process (channelz), or None if it cannot
    tell."""
    from grpc._cython import cygrpc  # channelz has no public Python API but its service

    try:
        servers = json.loads(cygrpc.channelz_get_servers(0)).get("server", [])
        return sum(int(s.get("data", {}).get("callsStarted", 0)) for s in servers)
    except Exception:  # channelz off (grpc.enable_channelz=0) or a format of another version
        return None


class CallBacklog:
    """The calls grpc core holds that no code of ours has taken yet, and how long the oldest of them
    has waited: past capacity calls wait there, because grpc.aio takes one call of a method at a
    time from grpc core, a few event loop iterations each (see the module's docstring).

    `sample(load)` reads channelz's count of calls started (all servers of the process) and the
    count of calls the interceptors saw (`saw_call`): the difference is what waits. Call n (in
    arrival order) arrived between the last sample that had fewer than n started and the first that
    had n, so the oldest waiting call's age is known to a sample's precision without a clock per
    call. A call cancelled while it waited (its deadline passed) is started and never seen, and
    channelz does not count it as finished either: such calls are the `baseline`, learnt while the
    loop is quiet, when no call can be waiting."""

    def __init__(self, *, started=core_calls_started, seen=calls_seen, clock=time.monotonic):
        self._started = started
        self._seen = seen
        self._clock = clock
        self.baseline = 0
        self.backlog = 0  # calls waiting
        self.wait = 0.0  # seconds the oldest of them has waited
        self._quiet: list[int] = []
        self._history: collections.deque[tuple[float, int]] = collections.deque()  # (time, started)

    def sample(self, load: float) -> int | None:
        started, seen, now = self._started(), self._seen(), self._clock()
        if started is None:
            return None
        waiting = started - seen
        self.baseline = min(self.baseline, waiting)  # never more than what is there
        if load <= QUIET_LOAD:
            self._quiet.append(waiting)
            if len(self._quiet) >= QUIET_SAMPLES:
                self.baseline = max(self.baseline, min(self._quiet))
                self._quiet.clear()
        else:
            self._quiet.clear()
        self.backlog = max(0, waiting - self.baseline)
        history = self._history
        history.append((now, started))
        # The oldest waiting call is number `oldest` of those started: drop the samples before the
        # one it first shows in (keeping one that had it, or the newest).
        oldest = started - self.backlog + 1
        while len(history) > 1 and (history[1][1] < oldest or history[0][0] < now - BACKLOG_HISTORY_SECONDS):
            history.popleft()
        if len(history) > 1 and history[0][1] < oldest:  # it came after that sample
            history.popleft()
        self.wait = now - history[0][0] if self.backlog > 0 else 0.0
        return self.backlog


class TimedSelector(selectors.DefaultSelector):
    """The platform's default selector, adding up the seconds its event loop waited in select()
    (`idle`): the rest of the wall time the loop was running callbacks or waiting for a CPU."""

    def __init__(self) -> None:
        super().__init__()
        self.idle = 0.0

    def select(self, timeout=None):
        start = time.perf_counter()
        try:
            return super().select(timeout)
        finally:
            self.idle += time.perf_counter() - start


_TIMED: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, TimedSelector] = weakref.WeakKeyDictionary()


def new_event_loop() -> asyncio.AbstractEventLoop:
    """The server's event loop: asyncio's selector loop on a `TimedSelector`, so that
    `LoopLagMonitor` reads its load (`asyncio.Runner(loop_factory=new_event_loop)`)."""
    selector = TimedSelector()
    loop = asyncio.SelectorEventLoop(selector)
    _TIMED[loop] = selector
    return loop


class StreamAdmission:
    """The open-stream count of one process and its adaptive limit (see the module's docstring).

    `take()` admits a new stream or says why not; `release()` gives its slot back; `adjust()` is
    called by `LoopLagMonitor` with each load sample; `retry_after()` is the delay a refusal asks
    for. `target_load` 0 turns the adaptive limit off (the limit stays at `ceiling`)."""

    def __init__(
        self,
        ceiling: int,
        *,
        max_starting: int | None = None,
        target_load: float = TARGET_LOAD,
        floor: int = MIN_STREAM_LIMIT,
        clock=time.monotonic,
        metrics=None,
    ):
        if ceiling < 1 or not 0 <= target_load < 1 or (max_starting is not None and max_starting < 1):
            raise ValueError("ceiling and max_starting must be positive and target_load in [0, 1)")
        self.ceiling = ceiling
        self.max_starting = max_starting  # None: no limit on starting streams
        self.starting = 0  # admitted streams that have not sent their first message yet
        self.floor = min(floor, ceiling)
        self.target_load = target_load
        self.limit = ceiling
        self.streams = 0
        self.metrics = metrics  # a metrics.Metrics: the stream limit gauge
        self._clock = clock
        self._next_decrease = 0.0
        self._refused = 0  # since the last sample
        self.refusal_rate = 0.0  # per second, smoothed
        self._last_sample: float | None = None
        if metrics is not None:
            metrics.stream_limit.set(self.limit)

    def take(self) -> str | None:
        """Admits a new stream (None) or names the cause of its refusal: `streams` (the ceiling),
        `load` (the adaptive limit) or `starting` (`max_starting` streams have not sent their first
        message yet). An admitted stream is starting until `started()` (or `release()`)."""
        if self.streams >= self.limit:
            self._refused += 1
            return "streams" if self.limit >= self.ceiling else "load"
        if self.max_starting is not None and self.starting >= self.max_starting:
            self._refused += 1
            return "starting"
        self.streams += 1
        self.starting += 1
        return None

    def started(self) -> None:
        """An admitted stream sent its first message."""
        self.starting -= 1

    def release(self, *, started: bool = True) -> None:
        """An admitted stream ended; `started` says whether `started()` was called for it."""
        self.streams -= 1
        if not started:
            self.starting -= 1

    def refused_elsewhere(self) -> None:
        """A stream refused for another cause (the lag brake) counts in the refusal rate too."""
        self._refused += 1

    def retry_after(self) -> float:
        base = min(max(1.0, self.refusal_rate / REFUSALS_PER_SECOND), RETRY_AFTER_MAX_SECONDS)
        return base * (1.0 + random.random())  # noqa: S311 - jitter, not a secret

    def adjust(self, load: float, *, overloaded: bool = False) -> None:
        """One load sample (0-1); `overloaded` forces the limit down (the lag brake is on)."""
        now = self._clock()
        if self._last_sample is not None and now > self._last_sample:
            rate = self._refused / (now - self._last_sample)
            self.refusal_rate += LOAD_SMOOTHING * (rate - self.refusal_rate)
        self._last_sample, self._refused = now, 0
        if self.target_load <= 0:
            return
        limit = self.limit
        load -= self.refusal_rate * REFUSAL_COST_SECONDS
        if overloaded or load > self.target_load + LOAD_BAND:
            if self.streams <= limit and now >= self._next_decrease:
                limit = max(self.floor, min(limit, int(self.streams * DECREASE_FACTOR)))
                self._next_decrease = now + DECREASE_EVERY_SECONDS
        elif load < self.target_load - LOAD_BAND and self.streams >= limit * 0.9:
            room = (self.target_load - LOAD_BAND - load) / self.target_load
            step = int(limit * min(INCREASE_MAX, INCREASE_SHARE * room))
            limit = min(self.ceiling, limit + max(1, step))
        if limit != self.limit:
            self.limit = limit
            if self.metrics is not None:
                self.metrics.stream_limit.set(limit)


class LoopLagMonitor:
    """How late the running event loop is, smoothed, in seconds (`lag`); the share of wall time it
    was not waiting for I/O (`load`, smoothed; from its `TimedSelector`, else its thread's CPU
    share); and that thread's CPU share (`busy`, smoothed, a gauge for operators). Each sample also
    goes to `admission` (a StreamAdmission), if given; every `backlog_every` samples it reads
    `backlog` (a CallBacklog: gauges). Start it on the loop it watches; `stop()` ends it."""

    def __init__(
        self,
        *,
        interval: float = LAG_INTERVAL_SECONDS,
        smoothing: float = LAG_SMOOTHING,
        metrics=None,
        warn_above: float | None = None,
        admission: StreamAdmission | None = None,
        backlog: CallBacklog | None = None,
        backlog_every: int = BACKLOG_EVERY_SAMPLES,
    ):
        if interval <= 0 or not 0 < smoothing <= 1:
            raise ValueError("interval must be positive and smoothing in (0, 1]")
        self.interval = interval
        self.smoothing = smoothing
        self.metrics = metrics  # a metrics.Metrics, for the loop lag gauge
        # Log when the smoothed lag goes above this (streams are being refused) and when it is back.
        self.warn_above = warn_above
        self.admission = admission
        self.backlog = backlog  # calls waiting in grpc core, read every `backlog_every` samples (gauges)
        self.backlog_every = max(1, backlog_every)
        self._samples = 0
        self._late = False
        self.lag = 0.0  # smoothed
        self.last = 0.0  # the latest sample
        self.peak = 0.0  # the largest sample seen
        self.busy = 0.0  # smoothed share of wall time the loop's thread spent on the CPU
        self.load = 0.0  # smoothed share of wall time the loop was not waiting for I/O
        self._task: asyncio.Task | None = None

    def __call__(self) -> float:
        return self.lag

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="loop-lag-monitor")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def observe(self, late: float) -> None:
        """One sample: the loop ran a timer `late` seconds after its deadline."""
        late = max(late, 0.0)
        self.last = late
        self.peak = max(self.peak, late)
        self.lag += self.smoothing * (min(late, LAG_SAMPLE_CAP_SECONDS) - self.lag)
        if self.metrics is not None:
            self.metrics.loop_lag.set(self.lag)
        if self.warn_above:
            late_now = self.lag > self.warn_above
            if late_now != self._late:
                self._late = late_now
                if late_now:
                    log.warning(
                        "the event loop is late: new streams are refused",
                        extra={"loop_lag_ms": round(self.lag * 1000, 1)},
                    )
                else:
                    log.info(
                        "the event loop is on time again", extra={"loop_lag_ms": round(self.lag * 1000, 1)}
                    )

    def observe_busy(self, share: float) -> None:
        self.busy += BUSY_SMOOTHING * (min(max(share, 0.0), 1.0) - self.busy)
        if self.metrics is not None:
            self.metrics.loop_busy.set(self.busy)

    def observe_load(self, share: float) -> None:
        self.load += LOAD_SMOOTHING * (min(max(share, 0.0), 1.0) - self.load)
        if self.metrics is not None:
            self.metrics.loop_load.set(self.load)
        backlog = self.backlog
        self._samples += 1
        if (
            backlog is not None
            and self._samples % self.backlog_every == 0
            and backlog.sample(self.load) is not None
            and self.metrics is not None
        ):
            self.metrics.call_backlog.set(backlog.backlog)
            self.metrics.call_wait.set(backlog.wait)
        if self.admission is not None:
            self.admission.adjust(self.load, overloaded=self._late)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        selector = _TIMED.get(loop)
        interval = self.interval
        cpu = time.thread_time()
        idle = selector.idle if selector is not None else 0.0
        while True:
            start = loop.time()
            await asyncio.sleep(interval)
            now, cpu_now = loop.time(), time.thread_time()
            wall = max(now - start, 1e-6)
            self.observe(now - start - interval)
            busy = (cpu_now - cpu) / wall
            self.observe_busy(busy)
            if selector is not None:
                idle_now = selector.idle
                self.observe_load(1.0 - (idle_now - idle) / wall)
                idle = idle_now
            else:
                self.observe_load(busy)
            cpu = cpu_now
