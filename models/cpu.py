"""How many cores this process may use *now*: the thread count every runtime gets by default.

Runtimes size their thread pools from the machine (torch and ONNX Runtime: every core;
their worker threads spin between ops). When another process is busy on the same cores,
N spinning workers on fewer free cores wait on each other at every op's barrier (one
descheduled worker stalls the rest), and a run slows far beyond its fair share. So the
default is the cores that are free when the work starts, measured over a short window of
``/proc/stat`` (the load average lags by a minute), within the cores the process may run
on (``sched_getaffinity``: containers and ``taskset`` limit it). An explicit ``--threads``
always wins. ``bench/load_fairness.py`` measures the effect.
"""
from __future__ import annotations

import os
import time

SAMPLE_SECONDS = 0.25


def usable_cores() -> int:
    """Cores this process may run on (affinity mask, cgroup-limited containers included)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _cpu_times() -> tuple[int, int] | None:
    """(idle, total) jiffies of all CPUs from /proc/stat, or None where there is none."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    values = [int(v) for v in fields[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)       # idle + iowait
    return idle, sum(values[:8])                                     # guest time is inside user


def free_cores(window: float = SAMPLE_SECONDS) -> float:
    """Idle cores over ``window`` seconds (machine-wide /proc/stat, capped at the usable
    cores); the one-minute load average where /proc/stat is missing."""
    usable = usable_cores()
    ncpu = os.cpu_count() or usable
    first = _cpu_times()
    if first is None:
        try:
            return max(0.0, min(usable, ncpu - os.getloadavg()[0]))
        except OSError:
            return float(usable)
    time.sleep(window)
    second = _cpu_times()
    assert second is not None
    total = second[1] - first[1]
    if total <= 0:
        return float(usable)
    idle = (second[0] - first[0]) / total * ncpu
    return max(0.0, min(float(usable), idle))


REUSE_SECONDS = 10.0
_last: tuple[float, int] | None = None


def default_threads(window: float = SAMPLE_SECONDS) -> int:
    """Threads for a runtime when the user named none: the free cores, rounded, at least 1.
    A measurement is reused for ``REUSE_SECONDS`` (verify loads several sessions at once)."""
    global _last
    now = time.monotonic()
    if _last is not None and now - _last[0] < REUSE_SECONDS:
        return _last[1]
    n = max(1, min(usable_cores(), int(free_cores(window) + 0.5)))
    _last = (time.monotonic(), n)
    return n


def shared(threads: int) -> bool:
    """Whether ``threads`` leaves workers competing for cores (fewer free than usable): then
    thread pools should sleep between ops rather than spin."""
    return threads < usable_cores()
