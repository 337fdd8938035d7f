"""``--pin``: the server under test alone on one core, everything else on the other.

On a 2-core machine wrk, the upstream and the proxy otherwise take turns on both cores, and
the scheduler's choices show up in the figures. Pinned, the proxy (all its processes and
threads) runs on the first CPU we may use, and every other process of the benchmark (this
script, hence the wrk it starts, the dev stack, the idle proxies) on the second. Set again
before each run, for that run's target.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from contextlib import suppress
from pathlib import Path

from scenario import BenchError

# Read before anything is pinned: once this process is pinned, it sees one CPU.
_ALLOWED = sorted(os.sched_getaffinity(0))


def cpus() -> tuple[int, int]:
    """The CPU of the server under test and the CPU of everything else."""
    if len(_ALLOWED) < 2:
        raise BenchError("--pin needs at least 2 CPUs")
    return _ALLOWED[0], _ALLOWED[1]


def _threads(pid: int) -> list[int]:
    try:
        return [int(entry.name) for entry in Path(f"/proc/{pid}/task").iterdir()]
    except OSError:
        return []


def _set(pids: Iterable[int], cpu: int) -> None:
    for pid in pids:
        for tid in _threads(pid):
            with suppress(OSError):  # a thread that has just ended
                os.sched_setaffinity(tid, {cpu})


def pin_alone(server: Sequence[int], others: Sequence[int]) -> None:
    """Every thread of ``server`` on the first CPU; those of ``others`` and of this process
    (whose children, like wrk, inherit it) on the second."""
    server_cpu, rest_cpu = cpus()
    _set([os.getpid(), *(pid for pid in others if pid not in server)], rest_cpu)
    _set(server, server_cpu)


def release(pids: Sequence[int]) -> None:
    """Every thread of ``pids`` and of this process back on all the CPUs we started with."""
    for pid in [os.getpid(), *pids]:
        for tid in _threads(pid):
            with suppress(OSError):
                os.sched_setaffinity(tid, _ALLOWED)
