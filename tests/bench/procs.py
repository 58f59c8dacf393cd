"""Processes of a benchmark run: start them, account their CPU and memory from /proc, stop them.

CPU is utime+stime from /proc/<pid>/stat (whole process, all threads). A group of processes (the
server replicas, PostgreSQL's backends, Envoy, ...) is sampled every SAMPLE_SECONDS: the last value
seen of every pid is kept, so a process that exits during a window still counts up to its last
sample. Memory is VmRSS sampled the same way (the peak of the group's sum) and VmHWM at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
SAMPLE_SECONDS = 0.25


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may contain spaces and parentheses: split after its last ')'.
    return raw[raw.rindex(")") + 2 :].split()


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of a live process, in seconds (None when it is gone)."""
    f = _stat_fields(pid)
    if f is None:
        return None
    # After the command name: state(0) ppid(1) ... utime(11) stime(12) cutime(13) cstime(14)
    return (int(f[11]) + int(f[12])) / CLK_TCK


def memory_kb(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) in KiB; zeros when the process is gone."""
    rss = hwm = 0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
            elif line.startswith("VmHWM:"):
                hwm = int(line.split()[1])
    except OSError:
        pass
    return rss, hwm


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent busy since boot (/proc/stat: everything but idle and iowait)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def children_map() -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        f = _stat_fields(int(entry.name))
        if f is not None:
            out.setdefault(int(f[1]), []).append(int(entry.name))
    return out


def tree(root: int, kids: dict[int, list[int]] | None = None) -> list[int]:
    """The pid and all its live descendants."""
    kids = kids if kids is not None else children_map()
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(kids.get(pid, ()))
    return out


@dataclass
class Group:
    """Processes accounted together (e.g. "server": every replica). `pids()` is asked at each sample,
    so groups can grow (PostgreSQL backends, worker processes)."""

    name: str
    pids: Callable[[], Iterable[int]]
    last_cpu: dict[int, float] = field(default_factory=dict)
    base_cpu: dict[int, float] = field(default_factory=dict)
    rss_now: int = 0
    rss_base: int = 0
    rss_peak: int = 0
    hwm: dict[int, int] = field(default_factory=dict)

    def sample(self) -> None:
        rss_sum = 0
        for pid in list(self.pids()):
            cpu = cpu_seconds(pid)
            if cpu is None:
                continue
            self.last_cpu[pid] = cpu
            rss, hwm = memory_kb(pid)
            rss_sum += rss
            self.hwm[pid] = max(self.hwm.get(pid, 0), hwm)
        self.rss_now = rss_sum
        self.rss_peak = max(self.rss_peak, rss_sum)

    def begin(self) -> None:
        """Start a window: CPU counts from here, the memory peak starts from the current RSS."""
        self.sample()
        self.base_cpu = dict(self.last_cpu)
        self.rss_base = self.rss_peak = self.rss_now

    def cpu(self) -> float:
        """CPU seconds since begin() (a pid first seen later counts from zero: it started later)."""
        return sum(v - self.base_cpu.get(pid, 0.0) for pid, v in self.last_cpu.items())

    def processes(self) -> int:
        return len([p for p in self.last_cpu if cpu_seconds(p) is not None])


class Sampler:
    """Samples every group every SAMPLE_SECONDS in the background (an asyncio task)."""

    def __init__(self) -> None:
        self.groups: dict[str, Group] = {}
        self._task: asyncio.Task | None = None

    def add(self, group: Group) -> Group:
        self.groups[group.name] = group
        return group

    def remove(self, name: str) -> None:
        self.groups.pop(name, None)

    def sample(self) -> None:
        for g in list(self.groups.values()):
            g.sample()

    def begin(self) -> None:
        for g in self.groups.values():
            g.begin()

    async def _run(self) -> None:
        while True:
            await asyncio.to_thread(self.sample)
            await asyncio.sleep(SAMPLE_SECONDS)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="sampler")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


# -- CPUs of the systems under test (--server-cpus) -----------------------------------------------

# Set by `pin_servers`: processes spawned with server=True run on these CPUs, everything else the
# run starts on the others. None: no pinning (every process may run on every CPU).
_server_cpus: frozenset[int] | None = None


def pin_servers(cpus: Iterable[int]) -> frozenset[int]:
    """From now on, what is spawned with server=True runs on `cpus`, and this process (and so what
    it starts otherwise: the mock, the load generators, an embedded PostgreSQL) on the CPUs left.
    Returns those. A PostgreSQL the run did not start is not moved."""
    global _server_cpus
    wanted, allowed = frozenset(cpus), frozenset(os.sched_getaffinity(0))
    if not wanted or not wanted < allowed:
        raise ValueError(f"--server-cpus must be some, not all, of the CPUs this may use: {sorted(allowed)}")
    rest = allowed - wanted
    pin(os.getpid(), rest)
    _server_cpus = wanted
    return rest


def pin(pid: int, cpus: Iterable[int]) -> None:
    """Every thread of `pid` (those it starts later inherit it) runs on `cpus` only."""
    cpus = set(cpus)
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return  # gone
    for tid in tids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.sched_setaffinity(tid, cpus)


def pin_server(pid: int) -> None:
    """A process of a system under test goes to the servers' CPUs (its threads and children inherit them)."""
    if _server_cpus is not None:
        pin(pid, _server_cpus)


def affinity(pids: Iterable[int]) -> list[int]:
    """The CPUs any of `pids` may run on (sorted)."""
    out: set[int] = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            out |= os.sched_getaffinity(pid)
    return sorted(out)


# -- subprocesses -----------------------------------------------------------------------------------


@dataclass
class Proc:
    """A subprocess of the run, in its own process group so stop() takes its children too."""

    name: str
    popen: subprocess.Popen
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def logs(self, tail: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-tail:]
        except OSError:
            return ""

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM the process group, SIGKILL it after `timeout`."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        # Whatever is left in the group (children that ignored SIGTERM) goes too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(5)
        return self.popen.returncode


def spawn(
    name: str,
    args: list[str],
    env: dict[str, str],
    log_path: Path,
    cwd: Path | None = None,
    *,
    server: bool = False,
) -> Proc:
    """Start `args` in its own process group; `server`: a process of a system under test, run on
    the servers' CPUs when the run pins them (`pin_servers`; it is pinned before it can start a
    thread or a child, which inherit it)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        popen = subprocess.Popen(
            args,
            env=env,
            cwd=cwd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: stop() reaches its children
        )
    if server:
        pin_server(popen.pid)
    return Proc(name, popen, log_path)


async def wait_for(
    check: Callable[[], object], what: str, proc: Proc | None = None, timeout: float = 60.0
) -> object:
    """Poll `check()` (bounded) until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = check()
        except Exception:  # noqa: BLE001 - not ready yet
            value = None
        if value:
            return value
        if proc is not None and not proc.alive():
            raise RuntimeError(
                f"{proc.name} exited with {proc.popen.returncode} while {what}:\n{proc.logs()}"
            )
        await asyncio.sleep(0.1)
    tail = proc.logs() if proc is not None else ""
    raise TimeoutError(f"timed out after {timeout:.0f}s {what}\n{tail}")


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def now() -> float:
    return time.time()
