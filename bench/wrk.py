"""wrk: installing it, one load run against a :class:`Target` and its parsed result.

bench/report.lua (and forward.lua) print one ``WRK_JSON {...}`` line at the end of a run;
that line, not wrk's text summary, is what is parsed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cpu import CpuSample
from scenario import ROOT, BenchError


def ensure_wrk() -> str:
    """Path of wrk; installed with apt-get when missing and we are root."""
    found = shutil.which("wrk")
    if found is not None:
        return found
    if os.geteuid() != 0:
        raise BenchError(
            "wrk is not installed and we are not root; install it "
            "(Debian/Ubuntu: sudo apt-get install wrk) and run again"
        )
    if shutil.which("apt-get") is None:
        raise BenchError("wrk is not installed and there is no apt-get; install wrk by hand")
    print("bench: wrk not found, installing it with apt-get ...", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "wrk"]):
        result = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise BenchError(f"{' '.join(argv)} failed:\n{result.stdout}{result.stderr}")
    found = shutil.which("wrk")
    if found is None:
        raise BenchError("apt-get installed wrk but it is not on PATH")
    return found


@dataclass(frozen=True, slots=True)
class Target:
    """One thing wrk loads: A direct, B minimal, C m2m-host or D m2m-forward."""

    key: str
    name: str
    description: str
    url: str
    script: Path
    server_pid: int  # whose CPU time per request is reported (the proxy, or the demo API)
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
    server_cpu_us: float = 0.0  # CPU time of the target's server process per request
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


def run_wrk(wrk: str, target: Target, *, duration: float, connections: int, threads: int) -> WrkRun:
    """One wrk run against ``target``; BenchError if wrk fails or prints no WRK_JSON line."""
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
        env={**os.environ, **dict(target.env)},
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
    )


def measure(
    wrk: str,
    target: Target,
    pids: Sequence[int],
    *,
    duration: float,
    connections: int,
    threads: int,
) -> WrkRun:
    """One wrk run plus the CPU accounting around it (``pids``: the benchmark's processes)."""
    before, started = CpuSample.take(pids), time.monotonic()
    run = run_wrk(wrk, target, duration=duration, connections=connections, threads=threads)
    after, wall = CpuSample.take(pids), time.monotonic() - started
    server_s = after.per_pid_s[target.server_pid] - before.per_pid_s[target.server_pid]
    run.server_cpu_us = server_s / max(run.requests, 1) * 1e6
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
