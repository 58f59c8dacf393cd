"""Admission control: past capacity a new stream is refused at once, never queued.

A server process has one event loop. Past what that loop can serve, every stream slows down
together: time to first token grows to seconds and grpc cancels calls the loop never picked up. So
new server-streaming calls are refused with RESOURCE_EXHAUSTED (reason SERVER_OVERLOADED, RetryInfo)
while either

- the process already holds `max_streams_per_process` open streams (a memory bound), or
- the event loop is late: `LoopLagMonitor` wakes every `interval` seconds and measures how much
  later than asked `asyncio.sleep` came back; a smoothed value above `max_loop_lag_seconds` means
  the loop has more ready work than it can run (a CPU bound, whatever the number of streams).

What it cannot see (measured on 2 cores, 1,000 offered streams): grpc.aio accepts one call at a
time (one outstanding request, answered through its completion-queue thread, so at least a couple of
loop iterations per call). A saturated process therefore leaves new calls, refusals included,
waiting in grpc core's queue before any of this code runs, while the loop's timer lag stays at
3-40 ms. The caps keep a process from taking on more than it can serve; turning the excess away in
milliseconds takes a proxy in front (Envoy's limits) or more processes.

Streams already admitted run on; unary calls (short, and how clients see an overloaded server's
state) and health checks are never refused by this. The lag is smoothed (an exponentially weighted
mean of samples capped at 250 ms) so that one long pause does not refuse calls for long, while
lateness that lasts crosses the threshold within a few samples; it falls back within a few
intervals once the load is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

log = logging.getLogger(__name__)

# Wake up often enough to see an overload within about half a second.
LAG_INTERVAL_SECONDS = 0.05
# Weight of the newest sample in the smoothed lag (about the last 5 samples count).
LAG_SMOOTHING = 0.2
# One sample counts at most this much: a single long pause (a slow garbage collection, a blocking
# call, a process that was stopped) must not refuse streams for long; lateness that lasts does.
LAG_SAMPLE_CAP_SECONDS = 0.25
BUSY_SMOOTHING = 0.1


class LoopLagMonitor:
    """How late the running event loop is, smoothed, in seconds (`lag`), and the share of wall time
    its thread spent on the CPU (`busy`, smoothed; a gauge for operators, not an admission rule).
    Start it on the loop it watches; `stop()` ends it."""

    def __init__(
        self,
        *,
        interval: float = LAG_INTERVAL_SECONDS,
        smoothing: float = LAG_SMOOTHING,
        metrics=None,
        warn_above: float | None = None,
    ):
        if interval <= 0 or not 0 < smoothing <= 1:
            raise ValueError("interval must be positive and smoothing in (0, 1]")
        self.interval = interval
        self.smoothing = smoothing
        self.metrics = metrics  # a metrics.Metrics, for the loop lag gauge
        # Log when the smoothed lag goes above this (streams are being refused) and when it is back.
        self.warn_above = warn_above
        self._late = False
        self.lag = 0.0  # smoothed
        self.last = 0.0  # the latest sample
        self.peak = 0.0  # the largest sample seen
        self.busy = 0.0  # smoothed share of wall time the loop's thread spent on the CPU
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

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        interval = self.interval
        cpu = time.thread_time()
        while True:
            start = loop.time()
            await asyncio.sleep(interval)
            now, cpu_now = loop.time(), time.thread_time()
            self.observe(now - start - interval)
            self.observe_busy((cpu_now - cpu) / max(now - start, 1e-6))
            cpu = cpu_now
