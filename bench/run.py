"""`make bench`: m2m-proxy's throughput, latency, CPU and memory next to a minimal aiohttp
proxy, nginx and proxy.py.

One self-contained run: installs wrk and nginx if needed (apt-get, as root) and proxy.py
(into bench/.venv-proxypy), starts the dev stack (oidc-provider IdP + the Node demo API, the
upstream), m2m-proxy, bench/minimal_proxy.py, nginx and proxy.py, warms them up, then loads
six targets with wrk, alternating A B C D N P for --reps rounds, each once at saturation
(req/s, CPU per request) and once paced to --rate req/s (latency, CPU per request at that
rate, peak RSS); --pin puts the server under test alone on one core:

  A  direct       the demo API itself, with a valid Authorization header
  B  minimal      bench/minimal_proxy.py (fixed Bearer header, reverse mode)
  C  m2m-host     m2m-proxy, origin-form request routed by its Host header
  D  m2m-forward  m2m-proxy, absolute-form request as HTTP_PROXY clients send it
  N  nginx        nginx reverse proxy, fixed Bearer header (bench/nginx.py)
  P  proxy.py     proxy.py forward proxy, absolute-form request, a plugin sets the Bearer
                  header (bench/proxypy.py, bench/proxypy_plugin.py)

Then (unless --no-https) the HTTPS-interception comparison in the same rig: m2m-proxy
against mitmproxy (installed on first use into bench/.venv-mitm), both intercepting CONNECT
to a routed host and adding the token, upstream the demo API over TLS; requests/s inside
keep-alive tunnels and new tunnels (handshakes)/s, by bench/tunnel_load.py (bench/https.py).

Prints tables and ratios, writes bench/results/latest.json and bench/results/https.json
and, with --write-docs, the results sections of docs/benchmarks.md. Every process it
starts is stopped on exit, Ctrl-C, SIGTERM or error. --hold starts everything and waits,
for profiling by hand.

--instructions measures instead what the noise of a shared VM cannot move: the instructions
each proxy process (B, C, D) executes per request, counted by valgrind's callgrind over a
fixed number of requests (bench/instructions.py), plus where C spends them; it writes
bench/results/instructions.json and the callgrind dumps to bench/results/callgrind/.

Modules, one concept each: scenario (constants), rig (the processes), install (apt-get and
own venvs for the tools), wrk, pace.lua and cpu (one load run, its pacing and its CPU and
memory accounting), pin (--pin), nginx, proxypy and proxypy_plugin (the peers), summary
(tables, ratios, verdicts), docs_section (what the generated docs sections share),
throughput (the wrk mode), https, https_summary, mitm, mitm_addon, tunnel_load and
tls_demo_api.mjs (the HTTPS part), instructions, hot_spots and callgrind_run (the
--instructions mode), machine (facts for the reports), outcome (the report's common fields
and the exit code). This file parses the command line and dispatches.

Exit code: 0 measured cleanly (whatever the ratios); 1 could not run, or a non-2xx answer,
a socket error, a rejection by the demo API or an unexpected token request (in either
part); 130 interrupted.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# deploy/dev_stack.py, imported as `dev_stack` like the tests do (mypy_path/pythonpath: deploy);
# bench/ itself is on sys.path as this script's folder.
if str(ROOT / "deploy") not in sys.path:
    sys.path.insert(0, str(ROOT / "deploy"))

from dev_stack import DevStackError  # noqa: E402

import instructions  # noqa: E402
from callgrind_run import InstructionSettings, count_instructions  # noqa: E402
from scenario import MITMPROXY_VERSION, PACED_RATE, PROXYPY_VERSION, BenchError  # noqa: E402
from throughput import Settings, bench, hold  # noqa: E402


def _default_python() -> str:
    """The repo's venv interpreter if there is one, else ours."""
    venv = ROOT / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, run the chosen mode; the process exit code."""
    parser = argparse.ArgumentParser(
        description="m2m-proxy vs a minimal aiohttp proxy vs the upstream directly (wrk)."
    )
    parser.add_argument(
        "--duration", type=int, default=10, help="seconds per wrk run, whole (wrk's -d) (10)"
    )
    parser.add_argument(
        "--reps",
        type=int,
        help="rounds of A B C D (3); with --instructions, counted samples per target (2)",
    )
    parser.add_argument(
        "--connections",
        type=int,
        help="wrk -c (32); with --instructions, keep-alive connections of the driver (4)",
    )
    parser.add_argument("--threads", type=int, default=1, help="wrk -t (1)")
    parser.add_argument(
        "--rate",
        type=float,
        default=PACED_RATE,
        help=f"req/s of the paced runs, the same for every target ({PACED_RATE:g})",
    )
    parser.add_argument(
        "--pin",
        action="store_true",
        help="the server under test alone on CPU 0, wrk and everything else on CPU 1",
    )
    parser.add_argument(
        "--peers",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also nginx (N) and proxy.py (P) (default: yes; --no-peers: A B C D only)",
    )
    parser.add_argument(
        "--proxypy-version",
        default=PROXYPY_VERSION,
        help=f"proxy.py installed into bench/.venv-proxypy ({PROXYPY_VERSION})",
    )
    parser.add_argument(
        "--warmup", type=int, default=3, help="seconds per target, whole (wrk's -d) (3)"
    )
    parser.add_argument(
        "--max-other-load",
        type=float,
        default=0.25,
        help="a run during which other processes (and hypervisor steal) used more cores than "
        "this is measured again (0.25)",
    )
    parser.add_argument(
        "--retries", type=int, default=4, help="repeats of disturbed runs, per benchmark (4)"
    )
    parser.add_argument("--python", default=_default_python(), help="interpreter of the proxies")
    parser.add_argument(
        "--write-docs", action="store_true", help="regenerate the results in docs/benchmarks.md"
    )
    parser.add_argument(
        "--hold",
        action="store_true",
        help="start everything, print wrk and py-spy commands, wait for Ctrl-C (profiling)",
    )
    parser.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        default="info",
        help="m2m-proxy's log_level (info: one request_completed line per request, as in "
        "production; warning: none, to see what the line costs)",
    )
    parser.add_argument(
        "--instructions",
        action="store_true",
        help="instead of wrk: instructions per request of B, C and D, counted by valgrind's "
        "callgrind (deterministic; about 3 minutes)",
    )
    parser.add_argument(
        "--requests",
        type=int,
        default=2000,
        help="with --instructions: requests per counted sample (2000)",
    )
    parser.add_argument(
        "--warmup-requests",
        type=int,
        default=300,
        help="with --instructions: uncounted requests per target before and after "
        "instrumentation is switched on (300)",
    )
    https = parser.add_argument_group("HTTPS interception vs mitmproxy (after the wrk part)")
    https.add_argument(
        "--https",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run the HTTPS comparison (default: yes; --no-https skips it)",
    )
    https.add_argument(
        "--https-only", action="store_true", help="only the HTTPS comparison, no wrk rounds"
    )
    https.add_argument("--https-duration", type=float, default=5.0, help="seconds per load run (5)")
    https.add_argument(
        "--https-connections",
        type=int,
        default=16,
        help="concurrent clients, each with its own tunnel (16)",
    )
    https.add_argument(
        "--https-warmup", type=float, default=2.0, help="seconds per proxy and measure (2)"
    )
    https.add_argument(
        "--mitmproxy-version",
        default=MITMPROXY_VERSION,
        help=f"installed into bench/.venv-mitm ({MITMPROXY_VERSION}: the newest for Python 3.11)",
    )
    https.add_argument(
        "--mitmproxy-python",
        help="interpreter of mitmproxy's venv (default: --python; mitmproxy 11.1+ needs 3.12+)",
    )
    args = parser.parse_args(argv)
    if args.https_only:
        args.https = True
    if args.reps is None:
        args.reps = 2 if args.instructions else 3
    if args.connections is None:
        args.connections = 4 if args.instructions else 32
    if args.duration <= 0 or args.reps < 1 or args.connections < args.threads or args.threads < 1:
        parser.error("need --duration > 0, --reps >= 1, --threads >= 1, --connections >= threads")
    if args.rate <= 0:
        parser.error("need --rate > 0")
    settings = Settings(
        duration=args.duration,
        reps=args.reps,
        connections=args.connections,
        threads=args.threads,
        warmup=args.warmup,
        python=args.python,
        write_docs=args.write_docs,
        retries=max(args.retries, 0),
        max_other_load=args.max_other_load,
        hold=args.hold,
        log_level=args.log_level,
        https=args.https and not args.instructions,
        https_only=args.https_only,
        https_duration=args.https_duration,
        https_connections=args.https_connections,
        https_warmup=args.https_warmup,
        mitmproxy_version=args.mitmproxy_version,
        mitmproxy_python=args.mitmproxy_python,
        rate=args.rate,
        pin=args.pin,
        peers=args.peers,
        proxypy_version=args.proxypy_version,
    )
    if args.https_duration <= 0 or args.https_connections < 1 or args.https_warmup < 0:
        parser.error("need --https-duration > 0, --https-connections >= 1, --https-warmup >= 0")
    if args.instructions:
        if args.hold or args.write_docs or args.https_only or args.pin:
            parser.error(
                "--instructions does not combine with --hold, --write-docs, --https-only or --pin"
            )
        if args.requests < 1 or args.warmup_requests < 1:
            parser.error("need --requests >= 1 and --warmup-requests >= 1")
    inst = InstructionSettings(
        python=args.python,
        log_level=args.log_level,
        requests=args.requests,
        samples=args.reps,
        connections=args.connections,
        warmup_requests=args.warmup_requests,
        idle_s=2.0,
    )
    try:
        if args.instructions:
            return count_instructions(inst)
        return hold(settings) if settings.hold else bench(settings)
    except KeyboardInterrupt:
        print("\nbench: interrupted; every process it started is stopped", file=sys.stderr)
        return 130
    except (
        BenchError,
        DevStackError,
        instructions.InstructionsError,
        subprocess.TimeoutExpired,
    ) as err:
        print(f"bench: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
