"""CPU (and memory) accounting from /proc, around each wrk run.

The machine is shared (2 cores, and often someone's test suite): besides wall-clock numbers,
each run records the server's CPU time per request and how many cores *other* processes used
meanwhile, so a disturbed run can be seen, and retried; and the server's peak resident
memory.
"""

from __future__ import annotations

import os
import resource
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

_TICKS = os.sysconf("SC_CLK_TCK")


def pid_cpu_s(pid: int) -> float:
    """utime + stime of a live process, in seconds (0 if it is gone)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
    except OSError:
        return 0.0
    fields = text.rpartition(")")[2].split()  # fields[0] is the state (field 3 of stat)
    return (int(fields[11]) + int(fields[12])) / _TICKS


def peak_rss_kb(pid: int) -> int:
    """VmHWM of a live process: the most resident memory it has had, in KiB (0 if gone)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text(encoding="ascii", errors="replace")
    except OSError:
        return 0
    for line in text.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def descendants(root: int) -> list[int]:
    """Live descendants of ``root`` (children, grandchildren, ...)."""
    parent: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                text = (entry / "stat").read_text(encoding="ascii", errors="replace")
            except OSError:
                continue
            parent[int(entry.name)] = int(text.rpartition(")")[2].split()[1])
    found: list[int] = []
    frontier = [root]
    while frontier:
        pid = frontier.pop()
        children = [child for child, ppid in parent.items() if ppid == pid]
        found += children
        frontier += children
    return found


def cmdline(pid: int) -> str:
    """The command line of ``pid``, arguments joined by spaces ("" if it is gone)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()


@dataclass(frozen=True, slots=True)
class CpuSample:
    """Cumulative CPU seconds at one instant; differences of two samples are what count."""

    busy_s: float  # whole machine, all cores, excluding idle, iowait and steal
    steal_s: float
    ours_s: float  # this script, its reaped children (wrk) and the long-running ones
    per_pid_s: dict[int, float]

    @classmethod
    def take(cls, pids: Sequence[int]) -> CpuSample:
        with open("/proc/stat", encoding="ascii") as stat:
            fields = [int(x) for x in stat.readline().split()[1:9]]
        user, nice, system, _idle, _iowait, irq, softirq, steal = fields
        per_pid = {pid: pid_cpu_s(pid) for pid in pids}
        me = resource.getrusage(resource.RUSAGE_SELF)
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        ours = sum(per_pid.values()) + me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime
        return cls(
            busy_s=(user + nice + system + irq + softirq) / _TICKS,
            steal_s=steal / _TICKS,
            ours_s=ours,
            per_pid_s=per_pid,
        )
