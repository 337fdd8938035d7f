"""Command line: ``m2m-proxy run|check|token --config FILE``, ``m2m-proxy ca init
--dir DIR`` and ``m2m-proxy schema``. argv in, exit code out.

Exit codes: 0 success, 2 invalid configuration or usage, 1 runtime failure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from m2m_proxy.app import fetch_token, serve
from m2m_proxy.config import Config, ConfigError, load_config
from m2m_proxy.config.schema import json_schema
from m2m_proxy.diagnose import describe_route, describe_token, resolve
from m2m_proxy.errors import ProxyError, TokenError
from m2m_proxy.interception_ca import CAError, init_ca
from m2m_proxy.logs import bridge_library_logs, make_logs

EXIT_CONFIG = 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "check":
        return _check(args.config)
    if args.command == "token":
        return _token(args.config, args.destination, show_token=args.show_token)
    if args.command == "schema":
        print(json.dumps(json_schema(), indent=2))
        return 0
    if args.command == "ca":
        return _ca_init(args.dir, args.common_name)
    return _run(args.config, watch=args.watch, allow_open=args.allow_open_listener)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="m2m-proxy",
        description="Forward proxy that adds OAuth2 client-credentials tokens to requests.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    subs = {}
    for name, text in (
        ("run", "run the proxy"),
        ("check", "validate a routes file; exit 0 if valid, 2 with every problem if not"),
        (
            "token",
            "show the route and client for a destination and fetch its token as the "
            "proxy would (the token itself only with --show-token)",
        ),
    ):
        sub = commands.add_parser(name, help=text, description=text)
        sub.add_argument(
            "--config", "-c", required=True, metavar="FILE", help="the routes file (YAML)"
        )
        subs[name] = sub
    subs["token"].add_argument(
        "destination", metavar="HOST[:PORT][/PATH]", help="or a full http(s):// URL"
    )
    subs["token"].add_argument("--show-token", action="store_true", help="print the token")
    subs["run"].add_argument(
        "--watch",
        action="store_true",
        help="reload the routes file when it changes (SIGHUP always reloads)",
    )
    subs["run"].add_argument(
        "--allow-open-listener",
        action="store_true",
        help="start even though a non-loopback listener has no allow_from/allow_users "
        "(something else, e.g. a network policy, limits who can reach it)",
    )
    text = "print the JSON Schema of the routes file (for editors: yaml-language-server)"
    commands.add_parser("schema", help=text, description=text)
    text = "the interception CA for https (CONNECT) routes"
    ca = commands.add_parser("ca", help=text, description=text)
    ca_commands = ca.add_subparsers(dest="ca_command", required=True)
    text = "create DIR/ca.pem and DIR/ca-key.pem (0600); never overwrites"
    init = ca_commands.add_parser("init", help=text, description=text)
    init.add_argument("--dir", required=True, metavar="DIR", help="where to write the files")
    init.add_argument(
        "--common-name", default="m2m-proxy interception CA", help="the CA's subject CN"
    )
    return parser


def _ca_init(directory: str, common_name: str) -> int:
    try:
        files = init_ca(Path(directory), common_name=common_name)
    except CAError as exc:
        print(f"m2m-proxy ca init: {exc}", file=sys.stderr)
        return 1
    print(f"created {files.cert_file} (trust this) and {files.key_file} (keep private, 0600)")
    print("add to the routes file:")
    print(f"  proxy:\n    ca_cert_file: {files.cert_file}\n    ca_key_file: {files.key_file}")
    return 0


def _load(path: str) -> Config | None:
    try:
        return load_config(path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        print(f"{len(exc.problems)} problem(s) in {path}", file=sys.stderr)
        return None


def _check(path: str) -> int:
    config = _load(path)
    if config is None:
        return EXIT_CONFIG
    if config.open_listener is not None:
        print(f"{path}: warning: {config.open_listener}", file=sys.stderr)
    print(f"{path}: OK ({len(config.clients)} clients, {len(config.routes)} routes)")
    return 0


def _token(path: str, destination: str, *, show_token: bool) -> int:
    config = _load(path)
    if config is None:
        return EXIT_CONFIG
    try:
        target, route = resolve(config, destination)
    except ProxyError as exc:
        print(f"{destination}: {exc.detail}", file=sys.stderr)
        return EXIT_CONFIG
    if route is None:
        print(
            f"{destination}: no route matches host '{target.host}' "
            f"(unmatched requests are: {config.proxy.unmatched.value})",
            file=sys.stderr,
        )
        return 1
    for line in describe_route(config, route):
        print(line)
    try:
        grant = asyncio.run(fetch_token(config, route.credential))
    except TokenError as exc:
        print(f"error     {exc.code}: {exc.detail}", file=sys.stderr)
        return 1
    for line in describe_token(grant, show_token=show_token):
        print(line)
    return 0


def _run(path: str, *, watch: bool = False, allow_open: bool = False) -> int:
    config = _load(path)
    if config is None:
        return EXIT_CONFIG
    if config.open_listener is not None and not allow_open:
        print(f"{path}: refusing to start: {config.open_listener}", file=sys.stderr)
        return EXIT_CONFIG
    secrets = [s for c in config.clients.values() for s in c.secrets]
    logs = make_logs(config.proxy.log_level, secrets=secrets)
    log = logs.events
    bridge_library_logs(log, config.proxy.log_level)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await serve(config, logs, stop, path=path, watch=watch)

    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            runner.run(run())
    except OSError as exc:
        log.error("startup_failed", reason=str(exc))
        return 1
    return 0


def _loop_factory() -> type[asyncio.AbstractEventLoop] | None:
    """uvloop when installed: the default, and measurably faster."""
    try:
        import uvloop  # noqa: PLC0415
    except ImportError:
        return None
    return uvloop.Loop
