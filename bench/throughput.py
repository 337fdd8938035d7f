"""The wrk mode (``make bench``): the rig plus the peers (nginx, proxy.py; unless
--no-peers), warm-up, --reps rounds of A B C D N P, each target once at saturation and once
paced to --rate, disturbed runs measured again, optionally --pin'ned; then the tables,
bench/results/latest.json and optionally the docs; then, unless --no-https, the
HTTPS-interception comparison with mitmproxy (bench/https.py) in the same rig; and --hold,
which starts the same processes and waits, for profiling by hand."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from docs_section import DOCS
from https import HttpsSettings, https_side, load_argv, measure_https
from https_summary import finish_https
from machine import machine_info
from mitm import ensure_mitmproxy, mitmproxy_version
from nginx import ensure_nginx, running_nginx
from outcome import print_tally, report_head, tally_json, verdict, write_report
from pin import cpus, release
from proxypy import ensure_proxypy, running_proxypy
from rig import Peer, Rig, Tally, rig
from scenario import BENCH, MITMPROXY_VERSION, PACED_RATE, PATH, PROXYPY_VERSION, ROOT
from summary import (
    TARGET_RATIO,
    Summary,
    peer_verdicts,
    per_round,
    per_round_pairs,
    ratios,
    render_docs_section,
    render_tables,
    run_line,
    write_docs,
)
from wrk import Target, WrkRun, ensure_wrk, measure, run_wrk, server_processes, wrk_command

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
    rate: float = PACED_RATE  # req/s of the paced runs (latency at a fixed rate)
    pin: bool = False  # the server under test alone on one core (bench/pin.py)
    peers: bool = True  # nginx and proxy.py next to A B C D
    proxypy_version: str = PROXYPY_VERSION

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
    installed = _install_peers(settings)
    load = {"connections": settings.connections, "threads": settings.threads}
    with (
        rig(settings.python, log_level=settings.log_level, https=mitmdump is not None) as r,
        _peers(r, installed) as peers,
    ):
        print(f"\nbench: ready. m2m-proxy pid {r.m2m.pid}, minimal proxy pid {r.minimal.pid}")
        print(f"  export T={r.token}")
        for target in _targets(r, peers):
            print(f"  {target.key} {target.name:<12} {wrk_command(wrk, target, **load)}")
        print(f"  paced: BENCH_RATE={settings.rate:g} before any of them (bench/pace.lua)")
        print(f"  profile: py-spy record -o profile.svg -d 10 -p {r.m2m.pid}  (during a wrk run)")
        if peers:
            print(f"  peers' pids: {', '.join(f'{p.target.name} {p.proc.pid}' for p in peers)}")
        if mitmdump is None:
            _wait_for_interrupt(r, _alive_check(peers))
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


def _wait_for_interrupt(r: Rig, check: Callable[[Rig], None]) -> NoReturn:
    print("Ctrl-C stops everything.", flush=True)
    while True:
        time.sleep(0.5)
        check(r)


def _alive_check(peers: list[Peer]) -> Callable[[Rig], None]:
    """A check that the rig and the peers are running (BenchError if not)."""

    def check(r: Rig) -> None:
        r.check_alive()
        for peer in peers:
            peer.check_alive()

    return check


@dataclass(frozen=True, slots=True)
class _Installed:
    """The peers' programs, installed if needed; None when --no-peers."""

    nginx: str | None
    proxypy: Path | None


def _install_peers(settings: Settings) -> _Installed:
    if not settings.peers or settings.https_only:
        return _Installed(None, None)
    return _Installed(ensure_nginx(), ensure_proxypy(settings.python, settings.proxypy_version))


@contextmanager
def _peers(r: Rig, installed: _Installed) -> Iterator[list[Peer]]:
    """nginx and proxy.py running next to ``r`` (none if not installed); stopped on exit."""
    with ExitStack() as stack:
        peers = []
        if installed.nginx is not None:
            peers.append(stack.enter_context(running_nginx(r, installed.nginx)))
        if installed.proxypy is not None:
            peers.append(stack.enter_context(running_proxypy(r, installed.proxypy)))
        if peers:
            print(
                "bench: peers running: "
                + ", ".join(f"{p.target.name} {p.version} (pid {p.proc.pid})" for p in peers),
                flush=True,
            )
        yield peers


def _targets(r: Rig, peers: list[Peer]) -> list[Target]:
    return [*r.targets, *(p.target for p in peers)]


def bench(settings: Settings) -> int:
    """Measure A B C D with wrk, then HTTPS interception against mitmproxy; 0 if both ran
    cleanly (see :func:`finish` and :func:`finish_https`)."""
    wrk = ensure_wrk()
    mitmdump = settings.mitmdump()
    installed = _install_peers(settings)
    if settings.pin:
        cpus()  # fails early on a single core
    machine = machine_info(settings.python, wrk)
    summaries: dict[str, Summary] | None = None
    peer_info: dict[str, dict[str, str]] = {}
    with rig(settings.python, log_level=settings.log_level, https=mitmdump is not None) as r:
        if not settings.https_only:
            with _peers(r, installed) as peers:
                peer_info = {
                    p.target.key: {
                        "name": p.target.name,
                        "version": p.version,
                        "settings": p.settings,
                    }
                    for p in peers
                }
                summaries = wrk_rounds(settings, wrk, r, peers)
        if mitmdump is not None:
            started = time.monotonic()
            with https_side(r, mitmdump, settings.python) as side:
                https_summaries = measure_https(r, side, settings.https_settings())
                upstream_stats = side.upstream_stats()
            https_elapsed = time.monotonic() - started
        tally = r.tally()
    if summaries is not None:
        code = finish(settings, machine=machine, summaries=summaries, tally=tally, peers=peer_info)
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


def wrk_rounds(settings: Settings, wrk: str, r: Rig, peers: list[Peer]) -> dict[str, Summary]:
    """Warm-up, then --reps rounds of every target, each once at saturation and once at
    --rate; per target its summary."""
    load = {"connections": settings.connections, "threads": settings.threads}
    targets = _targets(r, peers)
    alive = _alive_check(peers)
    # Every long-running process of the benchmark, for the CPU accounting ("other load").
    pids = list(
        dict.fromkeys([*r.pids, *(pid for p in peers for pid in server_processes(p.target))])
    )
    if settings.warmup > 0:
        print(f"bench: warming up each target for {settings.warmup:g} s ...", flush=True)
        for target in targets:
            run_wrk(wrk, target, duration=settings.warmup, **load)
            alive(r)
    summaries = {t.key: Summary(t) for t in targets}
    retries_left = settings.retries  # for the whole run, so it ends in bounded time

    def quiet_run(label: str, target: Target, rate: float | None) -> WrkRun:
        """One run, measured again while disturbed and repeats are left."""
        nonlocal retries_left
        attempt = 1
        while True:
            result = measure(
                wrk,
                target,
                pids,
                duration=settings.duration,
                rate=rate,
                pin=settings.pin,
                **load,
            )
            alive(r)
            result.attempts = attempt
            line = run_line(label, target, result)
            if result.disturbance <= settings.max_other_load or retries_left == 0:
                print(line, flush=True)
                return result
            print(f"{line}  (disturbed: measuring again)", flush=True)
            retries_left -= 1
            attempt += 1

    try:
        for rnd in range(1, settings.reps + 1):
            for target in targets:
                label = f"round {rnd}/{settings.reps}"
                summaries[target.key].runs.append(quiet_run(label, target, None))
                summaries[target.key].paced.append(quiet_run(label, target, settings.rate))
    finally:
        if settings.pin:  # the HTTPS part runs unpinned
            release(pids)
    return summaries


def finish(
    settings: Settings,
    *,
    machine: dict[str, Any],
    summaries: dict[str, Summary],
    tally: Tally,
    peers: dict[str, dict[str, str]],
) -> int:
    """Print and store the results; the exit code says whether the run was clean."""
    ratio = ratios(summaries)
    tables = render_tables(summaries, ratio, settings.rate)
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
            "rate": settings.rate,
            "pin_cpus": list(cpus()) if settings.pin else None,
            "targets": list(summaries),
        },
        "peers": peers,
        "targets": {key: s.as_json() for key, s in summaries.items()},
        "ratios": {k: round(v, 3) for k, v in ratio.items()},
        "ratios_per_round": {
            f"{key}_vs_{base}": [round(x, 3) for x in per_round(summaries, key, base)]
            for key, base in per_round_pairs(summaries)
        },
        "target_ratio": TARGET_RATIO,
        "peer_targets": [
            {"what": what, "ratio": round(value, 3), "target": f"{cmp} {bound}", "met": met}
            for what, value, cmp, bound, met in peer_verdicts(ratio)
        ],
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
        write_docs(render_docs_section(report, tables), pinned=settings.pin)
        print(f"docs: {DOCS.relative_to(ROOT)} updated")
    failed = [
        f"{s.target.key} {s.target.name}" for s in summaries.values() if any(s.errors.values())
    ]
    return verdict(tally, failed)
