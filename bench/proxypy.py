"""proxy.py as a peer (target P): PyPI's ``proxy.py`` (PROXYPY_VERSION), installed on first
use into its own venv, bench/.venv-proxypy (git-ignored; bench/install.py), run as a forward
proxy with bench/proxypy_plugin.py adding the bearer token, loaded by wrk exactly as D
m2m-forward is (bench/forward.lua: ``GET http://api.demo.local/hello``).

The name: api.demo.local does not resolve; m2m-proxy never resolves it either, its route's
``upstream:`` sends the request to the demo API's 127.0.0.1:PORT. The plugin does the same
for proxy.py (``before_upstream_connection`` replaces the host and port it connects to), so
both proxies get the same request bytes from wrk and forward ``GET /hello`` with ``Host:
api.demo.local`` to the same address, and neither does a DNS lookup.

Its fastest settings for this job (:func:`proxypy_argv`): ``--threadless`` (one event loop
per worker instead of a thread per connection), ``--num-acceptors 1`` with its default
``--local-executor 1`` (the acceptor process serves the connections it accepts: one
process doing the work, as m2m-proxy does), ``--num-workers 1``, ``--log-level WARNING``
(no access-log line), no dashboard, web server or TLS interception. It keeps one upstream
connection per client connection, reused for every request on it (keep-alive).
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from dev_stack import terminate

from cpu import cmdline, descendants
from install import ensure_venv
from rig import Peer, Rig, check_target, free_ports, start_process, wait_ready
from scenario import API_HOST, BENCH, FORWARD_URL, PROXYPY_VENV, PROXYPY_VERSION
from wrk import Target

PLUGIN = "proxypy_plugin.AddToken"  # bench/proxypy_plugin.py


def ensure_proxypy(python: str, version: str = PROXYPY_VERSION) -> Path:
    """The ``proxy`` command of proxy.py ``version`` in bench/.venv-proxypy."""

    def check(proxy: Path) -> str | None:
        found = proxypy_version(proxy)
        return None if found == version else f"{proxy} --version says {found}, not {version}"

    return ensure_venv(PROXYPY_VENV, f"proxy.py=={version}", python, "proxy", check=check)


def proxypy_version(proxy: Path) -> str:
    """The version ``proxy --version`` prints ("?" if it does not run)."""
    result = subprocess.run(
        [str(proxy), "--version"], capture_output=True, text=True, timeout=60, check=False
    )
    return result.stdout.strip() or "?"


def proxypy_argv(proxy: Path, port: int, data_dir: Path) -> list[str]:
    """proxy.py on 127.0.0.1:``port``, as fast as it goes for this job (see the module)."""
    return [
        str(proxy),
        "--hostname",
        "127.0.0.1",
        "--port",
        str(port),
        "--threadless",
        "--num-acceptors",
        "1",
        "--num-workers",
        "1",
        "--log-level",
        "WARNING",
        "--data-dir",
        str(data_dir),
        "--plugins",
        PLUGIN,
    ]


@contextmanager
def running_proxypy(r: Rig, proxy: Path) -> Iterator[Peer]:
    """proxy.py next to ``r``, checked with one request; stopped (with its acceptor) on exit."""
    (port,) = free_ports(1)
    upstream_host, _, upstream_port = r.stack.api_url.removeprefix("http://").partition(":")
    env = {
        **os.environ,
        "PYTHONPATH": str(BENCH),  # the plugin
        "BENCH_TOKEN": r.token,
        "BENCH_ROUTE_HOST": API_HOST,
        "BENCH_UPSTREAM_HOST": upstream_host,
        "BENCH_UPSTREAM_PORT": upstream_port.rstrip("/"),
    }
    log = r.workdir / "proxypy.stderr"
    proc = start_process(proxypy_argv(proxy, port, r.workdir / "proxypy"), env, log)
    children: list[int] = []
    try:
        proxy_url = f"http://127.0.0.1:{port}"
        target = Target(
            "P",
            "proxy.py",
            f"proxy.py {PROXYPY_VERSION} forward mode, GET http://api.demo.local/hello, "
            "plugin sets the Bearer header",
            f"{proxy_url}/",
            BENCH / "forward.lua",
            proc.pid,
            env=(("BENCH_FORWARD_URL", FORWARD_URL),),
        )
        wait_ready(
            "proxy.py",
            proc,
            lambda: check_target("P proxy.py", FORWARD_URL, {}, proxy=proxy_url),
            log,
        )
        children = descendants(proc.pid)
        yield Peer(
            target,
            proc,
            log,
            proxypy_version(proxy),
            settings="--threadless --num-acceptors 1 --num-workers 1 --log-level WARNING",
        )
    finally:
        terminate(proc)
        for pid in children:  # proxy.py stops its acceptor itself; in case it did not
            if str(proxy) in cmdline(pid):
                with suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
