"""How many cores this process may use, and how busy they are: the machine's side of the plan.

The planner must know what the machine can do now, not what it could do on
the day the defaults were chosen. Cores come from the CPU affinity mask and,
in a container, the cgroup's CPU quota (a Kubernetes pod limited to 2 CPUs on
a 64-core node has 2). Busy time comes from ``/proc/stat`` (every program on
the machine: a browser on the same box takes cores from us) and this process's
own CPU time (``time.process_time``, all its threads), so that what other
programs use can be told from what we use.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

PROC_STAT = Path("/proc/stat")
CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def usable_cores(cgroup_cpu_max: Path = CGROUP_CPU_MAX) -> float:
    """Cores this process may run on: its affinity mask, capped by a cgroup v2 CPU quota if one is set."""
    try:
        cores = float(len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        cores = float(os.cpu_count() or 1)
    try:
        quota, period = cgroup_cpu_max.read_text().split()[:2]
    except (OSError, ValueError):
        return cores
    if quota == "max":
        return cores
    try:
        return max(0.1, min(cores, int(quota) / int(period)))
    except (ValueError, ZeroDivisionError):
        return cores


def read_machine_busy(proc_stat: Path = PROC_STAT) -> tuple[float, float] | None:
    """(busy, total) CPU seconds of the whole machine since boot, or None where ``/proc/stat`` is missing."""
    try:
        with proc_stat.open() as handle:
            fields = handle.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    ticks = [int(value) for value in fields[1:9]]  # user nice system idle iowait irq softirq steal
    hertz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    idle = ticks[3] + ticks[4]
    total = sum(ticks)
    return (total - idle) / hertz, total / hertz


@dataclass(frozen=True, slots=True)
class LoadSample:
    """Cores in use over the last sampling period."""

    process: float  # this process, all threads
    others: float  # other programs, on as many cores as this process may use
    seconds: float  # the period's length


class MachineLoad:
    """Samples the machine's and this process's busy cores between two calls.

    ``cores``: what this process may use (default: :func:`usable_cores`);
    ``machine_cores``: what ``read_busy`` counts (default: every CPU of the
    machine). The readers are injectable so that tests can script a machine.
    """

    def __init__(
        self,
        cores: float | None = None,
        read_busy: Callable[[], tuple[float, float] | None] = read_machine_busy,
        process_time: Callable[[], float] = time.process_time,
        clock: Callable[[], float] = time.monotonic,
        machine_cores: int | None = None,
    ) -> None:
        self.cores = cores if cores is not None else usable_cores()
        self.machine_cores = machine_cores or max(1, os.cpu_count() or 1)
        self._read_busy = read_busy
        self._process_time = process_time
        self._clock = clock
        self._last = self._read()

    def _read(self) -> tuple[float, float | None, float | None, float]:
        busy = self._read_busy()
        return (
            self._clock(),
            None if busy is None else busy[0],
            None if busy is None else busy[1],
            self._process_time(),
        )

    def sample(self) -> LoadSample | None:
        """Cores used since the previous call (None if no time has passed)."""
        now, busy, total, process = current = self._read()
        then, busy_then, total_then, process_then = self._last
        seconds = now - then
        if seconds <= 0:
            return None
        self._last = current
        process_cores = max(0.0, (process - process_then) / seconds)
        if busy is None or busy_then is None or total is None or total_then is None or total <= total_then:
            return LoadSample(process_cores, 0.0, seconds)  # no view of other programs: assume there are none
        # /proc/stat counts every CPU of the machine, which may be more than we may use (a container's
        # quota, an affinity mask): other programs' load is taken as spread evenly over them.
        machine_cores = self.machine_cores * (busy - busy_then) / (total - total_then)
        others = max(0.0, machine_cores - process_cores) * min(1.0, self.cores / self.machine_cores)
        return LoadSample(process_cores, others, seconds)
