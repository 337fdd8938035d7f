"""The --instructions mode (``make bench-instructions``): B, C and D run under callgrind in
the rig, a fixed number of requests each is counted (bench/instructions.py), and the
instructions per request are reported with where C spends them; writes
bench/results/instructions.json and the dumps to bench/results/callgrind/."""

from __future__ import annotations

import shutil
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any

import instructions
from hot_spots import hot_spots
from machine import machine_info
from outcome import print_tally, report_head, tally_json, verdict, write_report
from rig import rig
from scenario import (
    API_HOST,
    BENCH,
    CLIENT_ID,
    FORWARD_URL,
    PATH,
    READY_TIMEOUT_S,
    ROOT,
    BenchError,
)

INSTRUCTIONS_JSON = BENCH / "results" / "instructions.json"
CALLGRIND_DIR = BENCH / "results" / "callgrind"


@dataclass(frozen=True, slots=True)
class InstructionSettings:
    """The --instructions mode's options, as given on the command line."""

    python: str  # interpreter of the proxies
    log_level: str  # m2m-proxy's
    requests: int
    samples: int
    connections: int
    warmup_requests: int
    idle_s: float


def count_instructions(inst: InstructionSettings) -> int:
    """Instructions per request of B, C and D under callgrind; see bench/instructions.py."""
    machine = machine_info(inst.python, None)
    shutil.rmtree(CALLGRIND_DIR, ignore_errors=True)  # old dumps would match new dump names
    CALLGRIND_DIR.mkdir(parents=True)
    out_files = {
        "minimal proxy": CALLGRIND_DIR / "callgrind.minimal",
        "m2m-proxy": CALLGRIND_DIR / "callgrind.m2m-proxy",
    }
    try:
        prefixes = {name: instructions.valgrind_argv(path) for name, path in out_files.items()}
    except instructions.InstructionsError as err:
        raise BenchError(str(err)) from err
    plan = instructions.Plan(
        requests=inst.requests,
        samples=inst.samples,
        connections=inst.connections,
        warmup=inst.warmup_requests,
        idle_s=inst.idle_s,
        client_id=CLIENT_ID,
    )
    started = time.monotonic()
    print("bench: the proxies will run under callgrind (starting them takes ~20 s)", flush=True)
    with rig(
        inst.python,
        prefixes=prefixes,
        # One hash seed: dict and set layouts (and so the probing) the same in every run.
        proxy_env={"PYTHONHASHSEED": "0"},
        ready_timeout_s=READY_TIMEOUT_S * 6,
        log_level=inst.log_level,
    ) as r:
        ports = {t.key: urllib.parse.urlsplit(t.url).port or 80 for t in r.targets}
        b_load = instructions.Load(
            "B", "minimal", ports["B"], instructions.get_request(PATH, API_HOST)
        )
        c_load = instructions.Load(
            "C", "m2m-host", ports["C"], instructions.get_request(PATH, API_HOST)
        )
        d_load = instructions.Load(
            "D", "m2m-forward", ports["C"], instructions.get_request(FORWARD_URL, API_HOST)
        )
        print(
            f"bench: {inst.samples} x {inst.requests} counted requests per target, "
            f"{inst.connections} keep-alive connections, after 2 x {inst.warmup_requests} "
            "warm-up requests",
            flush=True,
        )
        try:
            b = instructions.measure_process(
                r.minimal.pid, out_files["minimal proxy"], [b_load], plan, alive=r.check_alive
            )
            m2m = instructions.measure_process(
                r.m2m.pid, out_files["m2m-proxy"], [c_load, d_load], plan, alive=r.check_alive
            )
        except instructions.InstructionsError as err:
            raise BenchError(f"{err}\n{r.stderr_of('m2m-proxy')}") from err
        tally = r.tally()
    elapsed = time.monotonic() - started
    results = {"B": (b.measured[0], b), "C": (m2m.measured[0], m2m), "D": (m2m.measured[1], m2m)}
    base = results["B"][0].ir_per_request

    lines = [
        "| target | Ir/request | vs B minimal | samples (Ir/request) | spread | idle Ir/s |",
        "|---|---:|---:|---|---:|---:|",
    ]
    for key, (measured, proc) in results.items():
        samples = ", ".join(f"{s.ir_per_request:,.0f}" for s in measured.samples)
        lines.append(
            f"| {key} {measured.load.name} | {measured.ir_per_request:,.0f} "
            f"| {measured.ir_per_request / base:.3f}x | {samples} | {measured.spread:.2%} "
            f"| {proc.idle_ir_per_s:,.0f} |"
        )
    idle_share = max(
        proc.idle_ir_per_s * s.wall_s / s.ir
        for measured, proc in results.values()
        for s in measured.samples
    )
    lines += [
        "",
        f"Idle instructions (timers, housekeeping) over a sample's wall time would be at most "
        f"{idle_share:.2%} of its count: not subtracted.",
    ]
    table = "\n".join(lines)

    spots = hot_spots(results["C"][0].samples[0], results["B"][0].samples[0])

    report: dict[str, Any] = {
        **report_head(machine),
        "settings": {
            "requests_per_sample": inst.requests,
            "samples": inst.samples,
            "connections": inst.connections,
            "warmup_requests": inst.warmup_requests,
            "idle_s": inst.idle_s,
            "valgrind_options": list(instructions.VALGRIND_OPTIONS),
            "path": PATH,
            "m2m_log_level": inst.log_level,
        },
        "targets": {
            key: {
                "name": measured.load.name,
                "ir_per_request": round(measured.ir_per_request),
                "samples_ir_per_request": [round(s.ir_per_request) for s in measured.samples],
                "samples_wall_s": [round(s.wall_s, 2) for s in measured.samples],
                "spread": round(measured.spread, 5),
                "idle_ir_per_s": round(proc.idle_ir_per_s),
                "dumps": [str(s.dump.relative_to(ROOT)) for s in measured.samples],
            }
            for key, (measured, proc) in results.items()
        },
        "ratios": {
            "m2m_host_vs_minimal": round(results["C"][0].ir_per_request / base, 4),
            "m2m_forward_vs_minimal": round(results["D"][0].ir_per_request / base, 4),
        },
        **tally_json(tally),
        "elapsed_s": round(elapsed, 1),
    }
    write_report(INSTRUCTIONS_JSON, report)

    print()
    print(table)
    print()
    print(spots)
    print()
    print_tally(tally)
    dumps = CALLGRIND_DIR.relative_to(ROOT)
    print(f"results: {INSTRUCTIONS_JSON.relative_to(ROOT)}, dumps in {dumps}/")
    print(f"bench: {elapsed:.0f} s")
    return verdict(tally)
