"""The HTTPS-interception comparison: m2m-proxy against mitmproxy doing the same job.

Both proxies are asked for ``CONNECT api-tls.demo.local:443``, terminate TLS with a leaf
minted (once, then cached) from their own CA, add the bearer token to every decrypted GET
and send it to the same upstream: the dev stack's demo API served over TLS
(bench/tls_demo_api.mjs), certificate verified. m2m-proxy does it with its route (the
interception CA from ``m2m-proxy ca init``, the token it fetched and cached); mitmproxy
with ``mitmdump`` in regular proxy mode and a tiny addon (bench/mitm.py, mitm_addon.py)
given the token the benchmark fetched.

The upstream has to speak TLS: m2m-proxy never sends a request that arrived over TLS
upstream in cleartext (a route with an ``http://`` upstream answers 403 inside a tunnel).

Two measures, each by bench/tunnel_load.py in its own process, alternating the proxies
(m2m-proxy, mitmproxy, m2m-proxy, ...) for --reps rounds:

- ``keepalive``: requests per second inside long-lived intercepted tunnels (each of
  --https-connections clients opens one tunnel, then sends GET after GET on it);
- ``handshake``: new tunnels per second, each a new TCP connection, CONNECT, a full TLS
  handshake with the cached leaf, one GET and close.

Around each run the proxy's CPU time per request / per tunnel is read from /proc, and how
many cores other processes used (a disturbed run is measured again, as in the wrk mode).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dev_stack import terminate

from cpu import CpuSample
from mitm import mitmdump_argv
from rig import HttpsFiles, Rig, free_ports, start_process, wait_ready
from scenario import BENCH, CLIENT_ID, PATH, TLS_AUTHORITY, BenchError

MODES = ("keepalive", "handshake")
MODE_TITLES = {
    "keepalive": "requests/s in keep-alive tunnels",
    "handshake": "new tunnels/s (CONNECT + TLS handshake + 1 GET)",
}
UNIT = {"keepalive": "req/s", "handshake": "tunnels/s"}
_LOAD_SCRIPT = BENCH / "tunnel_load.py"


@dataclass(frozen=True, slots=True)
class HttpsSettings:
    """The HTTPS comparison's options, as given on the command line."""

    duration: float
    reps: int
    connections: int
    warmup: float
    python: str  # runs the load client (and m2m-proxy)
    max_other_load: float
    retries: int


@dataclass(frozen=True, slots=True)
class TunnelTarget:
    """One proxy, as the load client reaches it."""

    key: str
    name: str
    description: str
    proxy: str  # 127.0.0.1:PORT
    cafile: Path  # the CA its leaves chain to
    server_pid: int  # whose CPU time per operation is reported


@dataclass(slots=True)
class TunnelRun:
    """One load run (bench/tunnel_load.py's TUNNEL_JSON line) plus the CPU accounting."""

    mode: str
    rate: float  # requests/s (keepalive) or tunnels/s (handshake)
    ops: int
    duration_s: float
    latency_us: dict[str, float]
    errors: dict[str, int]
    client_cpu_cores: float
    server_cpu_us: float = 0.0  # the proxy's CPU time per request / per tunnel
    other_load: float = 0.0
    steal: float = 0.0
    attempts: int = 1

    @property
    def disturbance(self) -> float:
        return self.other_load + self.steal


@dataclass(slots=True)
class HttpsSide:
    """The upstream over TLS and mitmproxy, running; the two targets."""

    targets: list[TunnelTarget]
    pids: list[int]  # every long-running process of the benchmark, for CPU accounting
    files: HttpsFiles
    mitm: subprocess.Popen[bytes]
    tls_api: subprocess.Popen[bytes]
    logs: dict[str, Path]

    def stderr_of(self, name: str) -> str:
        return self.logs[name].read_text(encoding="utf-8", errors="replace")[-3000:]

    def check_alive(self, r: Rig) -> None:
        r.check_alive()
        for name, proc in (("mitmproxy", self.mitm), ("TLS demo API", self.tls_api)):
            if proc.poll() is not None:
                raise BenchError(f"{name} exited ({proc.returncode}):\n{self.stderr_of(name)}")

    def upstream_stats(self) -> dict[str, Any]:
        """The TLS demo API's counters (accepted, rejected_401, rejected_403)."""
        answer = _tls_get(f"{self.files.upstream_url}/__test/stats", self.files.upstream_ca)
        stats: dict[str, Any] = json.loads(answer)
        stats.pop("revoked", None)
        return stats


def _tls_get(url: str, cafile: Path) -> bytes:
    context = ssl.create_default_context(cafile=str(cafile))
    opener = urllib.request.build_opener(
        urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context)
    )
    with opener.open(url, timeout=10) as response:  # loopback
        body: bytes = response.read()
        return body


def _listening(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=1):
        return True


@contextmanager
def https_side(r: Rig, mitmdump: Path, python: str) -> Iterator[HttpsSide]:
    """Start the demo API over TLS and mitmdump next to ``r``; check one tunnel through each
    proxy; stop both on exit."""
    files = r.https
    if files is None:
        raise BenchError("the rig was started without https=True")
    node = shutil.which("node")
    if node is None:
        raise BenchError("node not found on PATH")
    logs = {"TLS demo API": r.workdir / "tls-api.stderr", "mitmproxy": r.workdir / "mitm.stderr"}
    base_env = {k: v for k, v in os.environ.items() if k != "EXIT_ON_STDIN_EOF"}
    with ExitStack() as cleanup:
        print("bench: starting the demo API over TLS and mitmproxy ...", flush=True)
        tls_api = start_process(
            [node, str(BENCH / "tls_demo_api.mjs")],
            {
                **base_env,
                "IDP_ISSUER": r.stack.issuer,
                "DEMO_HOST": "127.0.0.1",
                "DEMO_PORT": str(files.upstream_port),
                "BENCH_TLS_CERT_FILE": str(files.upstream_pem),
                "BENCH_TLS_KEY_FILE": str(files.upstream_pem),
            },
            logs["TLS demo API"],
        )
        cleanup.callback(terminate, tls_api)
        (mitm_port,) = free_ports(1)
        confdir = r.workdir / "mitmproxy"
        mitm = start_process(
            mitmdump_argv(mitmdump, mitm_port, confdir, files.upstream_ca),
            {
                **base_env,
                "BENCH_TOKEN": r.token,
                "BENCH_UPSTREAM_HOST": "127.0.0.1",
                "BENCH_UPSTREAM_PORT": str(files.upstream_port),
            },
            logs["mitmproxy"],
        )
        cleanup.callback(terminate, mitm)
        wait_ready(
            "the TLS demo API",
            tls_api,
            lambda: _tls_get(f"{files.upstream_url}/__test/stats", files.upstream_ca),
            logs["TLS demo API"],
        )
        mitm_ca = confdir / "mitmproxy-ca-cert.pem"

        def mitm_ready() -> None:
            if not mitm_ca.exists():
                raise OSError(f"mitmproxy has not written {mitm_ca.name} yet")
            _listening(mitm_port)

        wait_ready("mitmproxy", mitm, mitm_ready, logs["mitmproxy"])
        targets = [
            TunnelTarget(
                "m2m",
                "m2m-proxy",
                "m2m-proxy, route for api-tls.demo.local: leaf from `m2m-proxy ca init`'s CA, "
                "cached token",
                f"127.0.0.1:{r.proxy_port}",
                files.ca_cert,
                r.m2m.pid,
            ),
            TunnelTarget(
                "mitm",
                "mitmproxy",
                "mitmdump (regular mode) + bench/mitm_addon.py setting the token",
                f"127.0.0.1:{mitm_port}",
                mitm_ca,
                mitm.pid,
            ),
        ]
        side = HttpsSide(targets, [*r.pids, tls_api.pid, mitm.pid], files, mitm, tls_api, logs)
        for target in targets:  # one tunnel each: CONNECT, TLS, GET answered for our client
            check = run_load(python, target, "handshake", connections=1, duration=0.2)
            if check.errors or check.ops == 0:
                log = "m2m-proxy" if target.key == "m2m" else "mitmproxy"
                stderr = r.stderr_of(log) if target.key == "m2m" else side.stderr_of(log)
                raise BenchError(
                    f"{target.name}: no clean tunnel ({check.ops} done, errors {check.errors})"
                    f":\n{stderr}"
                )
        yield side


def load_argv(
    python: str, target: TunnelTarget, mode: str, *, connections: int, duration: float
) -> list[str]:
    """The bench/tunnel_load.py command line for one run."""
    return [
        python,
        str(_LOAD_SCRIPT),
        "--proxy",
        target.proxy,
        "--authority",
        TLS_AUTHORITY,
        "--cafile",
        str(target.cafile),
        "--mode",
        mode,
        "--connections",
        str(connections),
        "--duration",
        f"{duration:g}",
        "--path",
        PATH,
        "--client-id",
        CLIENT_ID,
    ]


def run_load(
    python: str, target: TunnelTarget, mode: str, *, connections: int, duration: float
) -> TunnelRun:
    """One bench/tunnel_load.py run; BenchError if it fails or prints no TUNNEL_JSON line."""
    argv = load_argv(python, target, mode, connections=connections, duration=duration)
    result = subprocess.run(
        argv, capture_output=True, text=True, timeout=duration + 120, check=False
    )
    line = next((x for x in result.stdout.splitlines() if x.startswith("TUNNEL_JSON ")), None)
    if result.returncode != 0 or line is None:
        raise BenchError(
            f"tunnel_load.py against {target.name} failed ({result.returncode}):\n"
            f"{result.stdout}{result.stderr[-3000:]}"
        )
    data = json.loads(line.removeprefix("TUNNEL_JSON "))
    return TunnelRun(
        mode=mode,
        rate=float(data["ops_per_s"]),
        ops=int(data["ops"]),
        duration_s=float(data["duration_s"]),
        latency_us={k: float(v) for k, v in data["latency_us"].items()},
        errors={k: int(v) for k, v in data["errors"].items()},
        client_cpu_cores=float(data["client_cpu_cores"]),
    )


def measure(
    python: str,
    target: TunnelTarget,
    mode: str,
    pids: Sequence[int],
    *,
    connections: int,
    duration: float,
) -> TunnelRun:
    """One load run plus the CPU accounting around it (``pids``: the benchmark's processes).

    The client's start-up and its tunnels' set-up are inside the accounting window, so
    ``other_load`` and the proxy's CPU per operation include them (the proxy's handshakes
    of the keep-alive mode's few tunnels are negligible next to thousands of requests)."""
    before, started = CpuSample.take(pids), time.monotonic()
    run = run_load(python, target, mode, connections=connections, duration=duration)
    after, wall = CpuSample.take(pids), time.monotonic() - started
    server_s = after.per_pid_s[target.server_pid] - before.per_pid_s[target.server_pid]
    run.server_cpu_us = server_s / max(run.ops, 1) * 1e6
    other = (after.busy_s - before.busy_s) - (after.ours_s - before.ours_s)
    run.other_load = max(other, 0.0) / wall
    run.steal = (after.steal_s - before.steal_s) / wall
    return run


@dataclass(slots=True)
class TunnelSummary:
    """The runs of one target in one mode, one per round."""

    target: TunnelTarget
    mode: str
    runs: list[TunnelRun] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return _median([r.rate for r in self.runs])

    @property
    def cpu_us(self) -> float:
        return _median([r.server_cpu_us for r in self.runs])

    def latency_ms(self, key: str) -> float:
        return _median([r.latency_us[key] for r in self.runs]) / 1000

    @property
    def client_cores(self) -> float:
        return _median([r.client_cpu_cores for r in self.runs])

    @property
    def disturbance(self) -> float:
        return max(r.disturbance for r in self.runs)

    @property
    def errors(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for run in self.runs:
            for key, value in run.errors.items():
                total[key] = total.get(key, 0) + value
        return total

    def as_json(self) -> dict[str, Any]:
        return {
            "target": self.target.name,
            "description": self.target.description,
            "mode": self.mode,
            "unit": UNIT[self.mode],
            "rate_median": round(self.rate, 1),
            "rate_min": round(min(r.rate for r in self.runs), 1),
            "rate_max": round(max(r.rate for r in self.runs), 1),
            "p50_ms_median": round(self.latency_ms("p50"), 3),
            "p99_ms_median": round(self.latency_ms("p99"), 3),
            "server_cpu_us_per_op_median": round(self.cpu_us, 1),
            "client_cpu_cores_median": round(self.client_cores, 2),
            "max_other_load_cores": round(self.disturbance, 2),
            "errors": self.errors,
            "runs": [
                {
                    "rate": round(r.rate, 1),
                    "ops": r.ops,
                    "duration_s": r.duration_s,
                    "latency_us": r.latency_us,
                    "errors": r.errors,
                    "server_cpu_us_per_op": round(r.server_cpu_us, 1),
                    "client_cpu_cores": round(r.client_cpu_cores, 2),
                    "other_load_cores": round(r.other_load, 2),
                    "steal_cores": round(r.steal, 2),
                    "attempts": r.attempts,
                }
                for r in self.runs
            ],
        }


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[middle]
    return (ordered[middle - 1] + ordered[middle]) / 2


def run_line(label: str, target: TunnelTarget, run: TunnelRun) -> str:
    """The progress line printed after each load run."""
    errors = f"  ERRORS: {run.errors}" if run.errors else ""
    return (
        f"bench: {label} {run.mode:<9} {target.name:<9}{run.rate:>8,.0f} {UNIT[run.mode]:<9}"
        f"  p50 {run.latency_us['p50'] / 1000:6.2f} ms  proxy CPU {run.server_cpu_us:5.0f} us/op"
        f"  client {run.client_cpu_cores:.2f} cores  other load {run.disturbance:.2f} cores"
        f"{errors}"
    )


def measure_https(
    r: Rig, side: HttpsSide, settings: HttpsSettings
) -> dict[tuple[str, str], TunnelSummary]:
    """Warm-up, then --reps rounds of each mode alternating the proxies; keyed by
    (mode, target key)."""
    load = {"connections": settings.connections}
    if settings.warmup > 0:
        print(
            f"bench: warming up each proxy for {settings.warmup:g} s per HTTPS mode ...",
            flush=True,
        )
        for mode in MODES:
            for target in side.targets:
                run_load(settings.python, target, mode, duration=settings.warmup, **load)
                side.check_alive(r)
    summaries = {(mode, t.key): TunnelSummary(t, mode) for mode in MODES for t in side.targets}
    retries_left = settings.retries
    for rnd in range(1, settings.reps + 1):
        for mode in MODES:
            for target in side.targets:
                attempt = 1
                while True:
                    result = measure(
                        settings.python,
                        target,
                        mode,
                        side.pids,
                        duration=settings.duration,
                        **load,
                    )
                    side.check_alive(r)
                    result.attempts = attempt
                    line = run_line(f"https {rnd}/{settings.reps}", target, result)
                    if result.disturbance <= settings.max_other_load or retries_left == 0:
                        break
                    print(f"{line}  (disturbed: measuring again)", flush=True)
                    retries_left -= 1
                    attempt += 1
                print(line, flush=True)
                summaries[(mode, target.key)].runs.append(result)
    return summaries
