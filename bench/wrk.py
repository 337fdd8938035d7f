"""wrk: installing it, one load run against a :class:`Target` and its parsed result, at
saturation or paced to a fixed rate.

bench/report.lua (and forward.lua, which loads it) print one ``WRK_JSON {...}`` line at the
end of a run; that line, not wrk's text summary, is what is parsed. wrk has no rate option:
with ``BENCH_RATE`` in its environment, report.lua loads pace.lua, whose ``delay()`` holds
each request until its slot on a fixed schedule.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cpu import CpuSample, descendants, peak_rss_kb
from install import ensure_apt
from pin import pin_alone
from scenario import ROOT, BenchError


def ensure_wrk() -> str:
    """Path of wrk; installed with apt-get when missing and we are root."""
    return ensure_apt("wrk", "wrk")


@dataclass(frozen=True, slots=True)
class Target:
    """One thing wrk loads: A direct, B minimal, C m2m-host, D m2m-forward, N nginx or
    P proxy.py."""

    key: str
    name: str
    description: str
    url: str
    script: Path
    # whose CPU time per request and peak RSS are reported, with its child processes (the
    # proxy, or the demo API for A; nginx's master and worker, proxy.py's acceptor)
    server_pid: int
    headers: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()


@dataclass(slots=True)
class WrkRun:
    """One wrk run; the CPU fields are filled by :func:`measure`."""

    rps: float
    requests: int
    duration_s: float
    latency_us: dict[str, float]
    errors: dict[str, int]
    response_bytes: float  # mean size of a response as wrk read it, headers included
    rate: float | None = None  # the paced rate asked for; None: saturation (as fast as it goes)
    server_cpu_us: float = 0.0  # CPU time of the target's server process(es) per request
    peak_rss_kb: int = 0  # VmHWM of the server process(es) after the run, summed
    other_load: float = 0.0  # cores busy with processes that are not part of the benchmark
    steal: float = 0.0  # cores taken by the hypervisor
    attempts: int = 1

    @property
    def error_total(self) -> int:
        return sum(self.errors.values())

    @property
    def disturbance(self) -> float:
        """Cores not available to the benchmark: other processes plus hypervisor steal."""
        return self.other_load + self.steal


def run_wrk(
    wrk: str,
    target: Target,
    *,
    duration: float,
    connections: int,
    threads: int,
    rate: float | None = None,
) -> WrkRun:
    """One wrk run against ``target``, paced to ``rate`` requests/s if given; BenchError if
    wrk fails or prints no WRK_JSON line."""
    argv = [
        wrk,
        f"-t{threads}",
        f"-c{connections}",
        f"-d{duration:g}s",
        "--latency",
        "--timeout",
        "10s",
        "-s",
        str(target.script),
    ]
    for header in target.headers:
        argv += ["-H", header]
    argv.append(target.url)
    result = subprocess.run(
        argv,
        env={**os.environ, **dict(target.env), **_pace_env(rate, threads)},
        capture_output=True,
        text=True,
        timeout=duration + 60,
        check=False,
    )
    line = next((x for x in result.stdout.splitlines() if x.startswith("WRK_JSON ")), None)
    if result.returncode != 0 or line is None:
        raise BenchError(
            f"wrk against {target.name} failed ({result.returncode}):\n"
            f"{result.stdout}{result.stderr}"
        )
    data = json.loads(line.removeprefix("WRK_JSON "))
    duration_s = data["duration_us"] / 1e6
    return WrkRun(
        rps=data["requests"] / duration_s,
        requests=int(data["requests"]),
        duration_s=duration_s,
        latency_us={k: float(v) for k, v in data["latency_us"].items()},
        errors={k: int(v) for k, v in data["errors"].items()},
        response_bytes=data["bytes"] / max(data["requests"], 1),
        rate=rate,
    )


def _pace_env(rate: float | None, threads: int) -> dict[str, str]:
    """pace.lua's setting: the rate of each wrk thread (each has its own Lua state)."""
    return {} if rate is None else {"BENCH_RATE": f"{rate / threads:.6g}"}


def server_processes(target: Target) -> list[int]:
    """The target's server process and its descendants (nginx's worker, proxy.py's acceptor)."""
    return [target.server_pid, *descendants(target.server_pid)]


def measure(
    wrk: str,
    target: Target,
    pids: Sequence[int],
    *,
    duration: float,
    connections: int,
    threads: int,
    rate: float | None = None,
    pin: bool = False,
) -> WrkRun:
    """One wrk run plus the CPU and memory accounting around it (``pids``: the benchmark's
    processes); ``pin``: the target's server alone on one core, everything else on the
    other (bench/pin.py)."""
    server = server_processes(target)
    pids = list(dict.fromkeys([*pids, *server]))
    if pin:
        pin_alone(server, pids)
    before, started = CpuSample.take(pids), time.monotonic()
    run = run_wrk(
        wrk, target, duration=duration, connections=connections, threads=threads, rate=rate
    )
    after, wall = CpuSample.take(pids), time.monotonic() - started
    server_s = sum(after.per_pid_s[pid] - before.per_pid_s[pid] for pid in server)
    run.server_cpu_us = server_s / max(run.requests, 1) * 1e6
    run.peak_rss_kb = sum(peak_rss_kb(pid) for pid in server)
    other = (after.busy_s - before.busy_s) - (after.ours_s - before.ours_s)
    run.other_load = max(other, 0.0) / wall
    run.steal = (after.steal_s - before.steal_s) / wall
    return run


def wrk_command(wrk: str, target: Target, *, connections: int, threads: int) -> str:
    """The wrk command line for one target, for --hold (the token shortened to $T)."""
    argv = [wrk, f"-t{threads}", f"-c{connections}", "-d10s", "--latency"]
    argv += ["-s", str(target.script.relative_to(ROOT))]
    for header in target.headers:
        if header.startswith("Authorization"):
            argv += ["-H", '"Authorization: Bearer $T"']
        else:
            argv += ["-H", f"'{header}'"]
    env = " ".join(f"{k}={v}" for k, v in target.env)
    return f"{env + ' ' if env else ''}{' '.join(argv)} {target.url}"
