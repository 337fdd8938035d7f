"""The wrk mode (``make bench``): warm-up, --reps rounds of A B C D with disturbed runs
measured again, then the tables, bench/results/latest.json and optionally the docs; then,
unless --no-https, the HTTPS-interception comparison with mitmproxy (bench/https.py) in the
same rig; and --hold, which starts the same rig and waits, for profiling by hand."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from https import HttpsSettings, https_side, load_argv, measure_https
from https_summary import finish_https
from machine import machine_info
from mitm import ensure_mitmproxy, mitmproxy_version
from outcome import print_tally, report_head, tally_json, verdict, write_report
from rig import Rig, Tally, rig
from scenario import BENCH, MITMPROXY_VERSION, PATH, ROOT
from summary import (
    DOCS,
    TARGET_RATIO,
    Summary,
    per_round,
    ratios,
    render_docs_section,
    render_tables,
    run_line,
    write_docs,
)
from wrk import ensure_wrk, measure, run_wrk, wrk_command

RESULTS_JSON = BENCH / "results" / "latest.json"


@dataclass(slots=True)
class Settings:
    """The wrk mode's options, as given on the command line."""

    duration: float
    reps: int
    connections: int
    threads: int
    warmup: float
    python: str
    write_docs: bool
    retries: int = 4
    max_other_load: float = 0.25
    hold: bool = False
    log_level: str = "info"
    https: bool = True  # the HTTPS-interception comparison with mitmproxy, after wrk's
    https_only: bool = False  # skip the wrk part
    https_duration: float = 5.0
    https_connections: int = 16
    https_warmup: float = 2.0
    mitmproxy_version: str = MITMPROXY_VERSION
    mitmproxy_python: str | None = None  # the interpreter of mitmproxy's venv (--python)

    def https_settings(self) -> HttpsSettings:
        return HttpsSettings(
            duration=self.https_duration,
            reps=self.reps,
            connections=self.https_connections,
            warmup=self.https_warmup,
            python=self.python,
            max_other_load=self.max_other_load,
            retries=self.retries,
        )

    def mitmdump(self) -> Path | None:
        """mitmdump, installed if needed; None without the HTTPS part."""
        if not self.https:
            return None
        return ensure_mitmproxy(self.mitmproxy_python or self.python, self.mitmproxy_version)


def hold(settings: Settings) -> int:
    """Start everything, print how to load and profile it, wait for Ctrl-C."""
    wrk = ensure_wrk()
    mitmdump = settings.mitmdump()
    load = {"connections": settings.connections, "threads": settings.threads}
    with rig(settings.python, log_level=settings.log_level, https=mitmdump is not None) as r:
        print(f"\nbench: ready. m2m-proxy pid {r.m2m.pid}, minimal proxy pid {r.minimal.pid}")
        print(f"  export T={r.token}")
        for target in r.targets:
            print(f"  {target.key} {target.name:<12} {wrk_command(wrk, target, **load)}")
        print(f"  profile: py-spy record -o profile.svg -d 10 -p {r.m2m.pid}  (during a wrk run)")
        if mitmdump is None:
            _wait_for_interrupt(r)
        with https_side(r, mitmdump, settings.python) as side:
            print(f"HTTPS (mitmproxy pid {side.mitm.pid}):")
            for tunnel in side.targets:
                for mode in ("keepalive", "handshake"):
                    argv = load_argv(
                        settings.python,
                        tunnel,
                        mode,
                        connections=settings.https_connections,
                        duration=10,
                    )
                    print(f"  {tunnel.name:<9} {mode:<9} {' '.join(argv)}")
            _wait_for_interrupt(r, side.check_alive)
    return 0


def _wait_for_interrupt(r: Rig, check: Callable[[Rig], None] | None = None) -> NoReturn:
    print("Ctrl-C stops everything.", flush=True)
    while True:
        time.sleep(0.5)
        if check is None:
            r.check_alive()
        else:
            check(r)


def bench(settings: Settings) -> int:
    """Measure A B C D with wrk, then HTTPS interception against mitmproxy; 0 if both ran
    cleanly (see :func:`finish` and :func:`finish_https`)."""
    wrk = ensure_wrk()
    mitmdump = settings.mitmdump()
    machine = machine_info(settings.python, wrk)
    summaries: dict[str, Summary] | None = None
    with rig(settings.python, log_level=settings.log_level, https=mitmdump is not None) as r:
        if not settings.https_only:
            summaries = wrk_rounds(settings, wrk, r)
        if mitmdump is not None:
            started = time.monotonic()
            with https_side(r, mitmdump, settings.python) as side:
                https_summaries = measure_https(r, side, settings.https_settings())
                upstream_stats = side.upstream_stats()
            https_elapsed = time.monotonic() - started
        tally = r.tally()
    if summaries is not None:
        code = finish(settings, machine=machine, summaries=summaries, tally=tally)
    else:
        print()
        print_tally(tally)
        code = verdict(tally)
    if mitmdump is not None:
        https_code = finish_https(
            settings.https_settings(),
            machine=machine,
            summaries=https_summaries,
            upstream_stats=upstream_stats,
            mitmproxy={
                "version": mitmproxy_version(mitmdump),
                "python": _python_version(settings.mitmproxy_python or settings.python),
            },
            elapsed_s=https_elapsed,
            write_to_docs=settings.write_docs,
        )
        code = max(code, https_code)
    return code


def _python_version(python: str) -> str:
    result = subprocess.run(
        [python, "-c", "import platform; print('Python', platform.python_version())"],
        capture_output=True,
        text=True,
        check=False,
    )
    return result.stdout.strip() or "?"


def wrk_rounds(settings: Settings, wrk: str, r: Rig) -> dict[str, Summary]:
    """Warm-up, then --reps rounds of A B C D; per target its summary."""
    load = {"connections": settings.connections, "threads": settings.threads}
    if settings.warmup > 0:
        print(f"bench: warming up each target for {settings.warmup:g} s ...", flush=True)
        for target in r.targets:
            run_wrk(wrk, target, duration=settings.warmup, **load)
            r.check_alive()
    summaries = {t.key: Summary(t) for t in r.targets}
    retries_left = settings.retries  # for the whole run, so it ends in bounded time
    for rnd in range(1, settings.reps + 1):
        for target in r.targets:
            attempt = 1
            while True:
                result = measure(wrk, target, r.pids, duration=settings.duration, **load)
                r.check_alive()
                result.attempts = attempt
                line = run_line(f"round {rnd}/{settings.reps}", target, result)
                if result.disturbance <= settings.max_other_load or retries_left == 0:
                    break
                print(f"{line}  (disturbed: measuring again)", flush=True)
                retries_left -= 1
                attempt += 1
            print(line, flush=True)
            summaries[target.key].runs.append(result)
    return summaries


def finish(
    settings: Settings, *, machine: dict[str, Any], summaries: dict[str, Summary], tally: Tally
) -> int:
    """Print and store the results; the exit code says whether the run was clean."""
    ratio = ratios(summaries)
    tables = render_tables(summaries, ratio)
    report: dict[str, Any] = {
        **report_head(machine),
        "settings": {
            "duration_s": settings.duration,
            "reps": settings.reps,
            "connections": settings.connections,
            "threads": settings.threads,
            "warmup_s": settings.warmup,
            "retries": settings.retries,
            "max_other_load_cores": settings.max_other_load,
            "path": PATH,
            "m2m_log_level": settings.log_level,
        },
        "targets": {key: s.as_json() for key, s in summaries.items()},
        "ratios": {k: round(v, 3) for k, v in ratio.items()},
        "ratios_per_round": {
            f"{key}_vs_{base}": [round(x, 3) for x in per_round(summaries, key, base)]
            for key, base in (("C", "B"), ("D", "B"), ("B", "A"), ("C", "A"), ("D", "A"))
        },
        "target_ratio": TARGET_RATIO,
        **tally_json(tally),
    }
    write_report(RESULTS_JSON, report)
    print()
    print(tables)
    print()
    print_tally(tally)
    disturbed = [
        f"{s.target.key} ({s.disturbance:.2f} cores)"
        for s in summaries.values()
        if s.disturbance > settings.max_other_load
    ]
    if disturbed:
        print(
            "bench: WARNING: other processes used CPU during some runs (no repeats left): "
            f"{', '.join(disturbed)}; treat those figures with care, or run again on a quiet "
            "machine"
        )
    print(f"results: {RESULTS_JSON.relative_to(ROOT)}")
    if settings.write_docs:
        write_docs(render_docs_section(report, tables))
        print(f"docs: {DOCS.relative_to(ROOT)} updated")
    failed = [
        f"{s.target.key} {s.target.name}" for s in summaries.values() if any(s.errors.values())
    ]
    return verdict(tally, failed)
