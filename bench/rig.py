"""The process rig: the dev stack, m2m-proxy and the minimal proxy, started, checked ready
and stopped again, whatever happens (see :func:`rig`). With ``https=True`` m2m-proxy also
gets an interception CA and a route for TLS_HOST whose upstream is the demo API over TLS
(:class:`HttpsFiles`; bench/https.py starts that upstream and mitmproxy).

``dev_stack`` is deploy/dev_stack.py, imported as the tests do: run.py puts deploy/ on
sys.path, mypy finds it through mypy_path.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import trustme
from dev_stack import DevStack, DevStackError, terminate, wait_proxy_ready

from cpu import cmdline, descendants
from scenario import (
    API_HOST,
    BENCH,
    CLIENT_ID,
    FORWARD_URL,
    PATH,
    READY_TIMEOUT_S,
    RESOURCE,
    ROOT,
    SCOPE,
    TLS_HOST,
    TOKEN_TTL_S,
    BenchError,
)
from wrk import Target

# Loopback only: never through an HTTP_PROXY from the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_ports(count: int) -> list[int]:
    """Ports the kernel just handed out (all held at once, so they are distinct)."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def fetch_token(stack: DevStack) -> str:
    """One client-credentials token for the minimal proxy's and the direct target's header."""
    basic = base64.b64encode(f"{CLIENT_ID}:{stack.dev_client_secret}".encode()).decode()
    form = urllib.parse.urlencode(
        {"grant_type": "client_credentials", "scope": SCOPE, "resource": RESOURCE}
    ).encode()
    request = urllib.request.Request(  # noqa: S310 - the dev IdP on 127.0.0.1
        stack.token_url,
        data=form,
        headers={
            "Authorization": f"Basic {basic}",
            "Content-Type": "application/x-www-form-urlencoded",
        },
        method="POST",
    )
    try:
        with _OPENER.open(request, timeout=10) as response:
            answer = json.loads(response.read())
    except urllib.error.HTTPError as err:
        raise BenchError(f"token request failed: HTTP {err.code} {err.read()!r}") from err
    token = answer.get("access_token")
    if not isinstance(token, str) or not token:
        raise BenchError(f"token response has no access_token: {sorted(answer)}")
    return token


@dataclass(frozen=True, slots=True)
class HttpsFiles:
    """What the HTTPS-interception benchmark needs before m2m-proxy starts: its
    interception CA, and the certificate and port of the demo API served over TLS."""

    ca_cert: Path  # m2m-proxy's interception CA (`m2m-proxy ca init`): clients trust it
    ca_key: Path
    upstream_ca: Path  # signs the TLS demo API's certificate; both proxies verify with it
    upstream_pem: Path  # the TLS demo API's key and certificate chain
    upstream_port: int

    @property
    def upstream_url(self) -> str:
        return f"https://127.0.0.1:{self.upstream_port}"


def make_https_files(python: str, directory: Path, upstream_port: int) -> HttpsFiles:
    """A new interception CA made by m2m-proxy's own `ca init`, and an upstream certificate
    for 127.0.0.1 (and TLS_HOST, whichever name a proxy verifies) from a throwaway CA."""
    result = subprocess.run(
        [python, "-m", "m2m_proxy", "ca", "init", "--dir", str(directory / "ca")],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise BenchError(f"m2m-proxy ca init failed:\n{result.stdout}{result.stderr}")
    authority = trustme.CA()
    leaf = authority.issue_cert("127.0.0.1", TLS_HOST, "localhost")
    files = HttpsFiles(
        ca_cert=directory / "ca" / "ca.pem",
        ca_key=directory / "ca" / "ca-key.pem",
        upstream_ca=directory / "upstream-ca.pem",
        upstream_pem=directory / "upstream.pem",
        upstream_port=upstream_port,
    )
    authority.cert_pem.write_to_path(str(files.upstream_ca))
    leaf.private_key_and_cert_chain_pem.write_to_path(str(files.upstream_pem))
    return files


def routes_yaml(
    stack: DevStack,
    listen: int,
    admin: int,
    log_level: str = "info",
    https: HttpsFiles | None = None,
) -> str:
    """m2m-proxy's config for one run: one client, one route to the demo API (and with
    ``https``, the interception CA and a second route, to the demo API over TLS)."""
    ca = (
        "" if https is None else f"  ca_cert_file: {https.ca_cert}\n  ca_key_file: {https.ca_key}\n"
    )
    tls_route = (
        ""
        if https is None
        else f"""\
  - host: {TLS_HOST}         # CONNECT {TLS_HOST}:443 is intercepted (bench/https.py)
    client: {CLIENT_ID}
    scope: {SCOPE}
    resource: {RESOURCE}     # the same credential: the same cached token
    upstream: {https.upstream_url}
    ca_file: {https.upstream_ca}
"""
    )
    return f"""\
# Generated by bench/run.py for one benchmark run.
proxy:
  listen: 127.0.0.1:{listen}
  admin_listen: 127.0.0.1:{admin}
  unmatched: deny
  log_level: {log_level:<19} # info: the request_completed line is part of the cost measured
{ca}clients:
  {CLIENT_ID}:
    token_url: {stack.token_url}
    client_id: {CLIENT_ID}
    client_secret: ${{BENCH_CLIENT_SECRET}}
    auth_method: client_secret_basic
routes:
  - host: {API_HOST}
    client: {CLIENT_ID}
    scope: {SCOPE}
    resource: {RESOURCE}
    upstream: {stack.api_url}
{tls_route}"""


def start_process(argv: list[str], env: dict[str, str], stderr: Path) -> subprocess.Popen[bytes]:
    """Start ``argv`` in its own session, stdout discarded, stderr to the file ``stderr``."""
    # Own session: a terminal Ctrl-C reaches only us, and we stop the children in order.
    with stderr.open("wb") as err:
        return subprocess.Popen(
            argv,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,  # m2m-proxy logs one JSON line per request: discarded
            stderr=err,
            start_new_session=True,
        )


def http_get(url: str, headers: dict[str, str], proxy: str | None = None) -> tuple[int, bytes]:
    """Status and body of one GET (any status), through ``proxy`` if given."""
    handlers = urllib.request.ProxyHandler({"http": proxy} if proxy else {})
    request = urllib.request.Request(url, headers=headers)  # noqa: S310 - loopback
    try:
        with urllib.request.build_opener(handlers).open(request, timeout=10) as response:
            return int(response.status), response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def check_target(name: str, url: str, headers: dict[str, str], proxy: str | None = None) -> None:
    """One request the way wrk will send it: must be a 200 from the demo API with a token."""
    status, body = http_get(url, headers, proxy)
    if status != 200:
        raise BenchError(f"{name}: GET {url} -> {status}: {body[:300]!r}")
    answer = json.loads(body)
    if answer.get("client_id") != CLIENT_ID or answer.get("authorization_count") != 1:
        raise BenchError(f"{name}: unexpected answer from the demo API: {answer}")


def wait_ready(
    name: str,
    proc: subprocess.Popen[bytes],
    check: Callable[[], object],
    log: Path,
    timeout_s: float = READY_TIMEOUT_S,
) -> None:
    """Poll until ``check()`` (e.g. one request, :func:`check_target`) returns without raising
    OSError (its result is ignored); BenchError with the tail of ``log`` if ``proc`` exits
    or nothing answers in time."""
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            tail = log.read_text(encoding="utf-8", errors="replace")[-3000:]
            raise BenchError(f"{name} exited with code {proc.returncode}:\n{tail}")
        try:
            check()
            return
        except (urllib.error.URLError, OSError):
            if time.monotonic() > deadline:
                tail = log.read_text(encoding="utf-8", errors="replace")[-3000:]
                raise BenchError(f"{name} not answering after {timeout_s:.0f} s:\n{tail}") from None
            time.sleep(0.1)


@dataclass(frozen=True, slots=True)
class Peer:
    """Another proxy compared with m2m-proxy (nginx, proxy.py), running next to the rig."""

    target: Target
    proc: subprocess.Popen[bytes]
    log: Path  # its stderr
    version: str
    settings: str  # how it is configured, in a few words, for the reports

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            tail = self.log.read_text(encoding="utf-8", errors="replace")[-3000:]
            raise BenchError(f"{self.target.name} exited ({self.proc.returncode}):\n{tail}")


def _raise_interrupt(_signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt


@contextmanager
def _children_stopped() -> Iterator[ExitStack]:
    """An ExitStack that closes with SIGINT/SIGTERM ignored, so a second Ctrl-C cannot
    abandon children half-stopped; SIGTERM to us unwinds like Ctrl-C."""
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    # Also when started in the background, where the shell made us ignore SIGINT.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with ExitStack() as stack:
            try:
                yield stack
            finally:
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, previous)


@dataclass(frozen=True, slots=True)
class Tally:
    """What the IdP, the demo API and m2m-proxy saw during a run, read before they stop."""

    token_requests: int
    api_stats: dict[str, Any]
    m2m_stderr: str


@dataclass(slots=True)
class Rig:
    """Everything a benchmark talks to, started and checked; see :func:`rig`."""

    stack: DevStack
    token: str
    m2m: subprocess.Popen[bytes]
    minimal: subprocess.Popen[bytes]
    logs: dict[str, Path]
    targets: list[Target]
    pids: list[int]  # every long-running process of the benchmark, for CPU accounting
    proxy_port: int  # m2m-proxy's listener
    workdir: Path  # the run's temporary directory (removed at the end)
    https: HttpsFiles | None = None

    def stderr_of(self, name: str) -> str:
        return self.logs[name].read_text(encoding="utf-8", errors="replace")[-3000:]

    def check_alive(self) -> None:
        """BenchError if the dev stack or a proxy has died."""
        problem = self.stack.failed()
        for name, proc in (("m2m-proxy", self.m2m), ("minimal proxy", self.minimal)):
            if problem is None and proc.poll() is not None:
                problem = f"{name} exited ({proc.returncode}):\n{self.stderr_of(name)}"
        if problem is not None:
            raise BenchError(problem)

    def tally(self) -> Tally:
        """Token requests, demo API statistics and m2m-proxy's stderr so far."""
        return Tally(
            token_requests=len(self.stack.token_requests()),
            api_stats=self.stack.api_stats(),
            m2m_stderr=self.stderr_of("m2m-proxy").strip(),
        )


@contextmanager
def rig(
    python: str,
    *,
    prefixes: dict[str, list[str]] | None = None,
    proxy_env: dict[str, str] | None = None,
    ready_timeout_s: float = READY_TIMEOUT_S,
    log_level: str = "info",
    https: bool = False,
) -> Iterator[Rig]:
    """Start the dev stack, m2m-proxy and the minimal proxy; check one request per target
    (which also makes m2m-proxy fetch and cache its token); stop them all on exit.

    ``prefixes`` maps "m2m-proxy" / "minimal proxy" to a command that runs the proxy (e.g.
    valgrind and its options); ``proxy_env`` is added to both proxies' environment;
    ``log_level`` is m2m-proxy's; ``https`` prepares the HTTPS-interception benchmark
    (:class:`HttpsFiles`, in ``Rig.https``)."""
    prefix = prefixes or {}
    grace_s = 30.0 if prefix else 5.0  # valgrind takes a while to exit (and write its files)
    with _children_stopped() as cleanup:
        tmp = Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="m2m-bench-")))
        print("bench: starting the dev IdP and demo API ...", flush=True)
        stack = DevStack(ROOT, token_ttl_s=TOKEN_TTL_S)
        cleanup.callback(stack.stop)
        stack.start()
        token = fetch_token(stack)

        proxy_port, admin_port, minimal_port, tls_api_port = free_ports(4)
        https_files = make_https_files(python, tmp, tls_api_port) if https else None
        config = tmp / "routes.yaml"
        config.write_text(
            routes_yaml(stack, proxy_port, admin_port, log_level, https_files), encoding="utf-8"
        )
        env = {**os.environ, **(proxy_env or {}), "BENCH_CLIENT_SECRET": stack.dev_client_secret}
        env.pop("BENCH_TOKEN", None)
        logs = {"m2m-proxy": tmp / "m2m-proxy.stderr", "minimal proxy": tmp / "minimal.stderr"}
        m2m = start_process(
            [
                *prefix.get("m2m-proxy", []),
                python,
                "-m",
                "m2m_proxy",
                "run",
                "--config",
                str(config),
            ],
            env,
            logs["m2m-proxy"],
        )
        cleanup.callback(terminate, m2m, grace_s)
        minimal = start_process(
            [
                *prefix.get("minimal proxy", []),
                python,
                str(BENCH / "minimal_proxy.py"),
                "--listen",
                f"127.0.0.1:{minimal_port}",
                stack.api_url,
            ],
            {**env, "BENCH_TOKEN": token},
            logs["minimal proxy"],
        )
        cleanup.callback(terminate, minimal, grace_s)
        pids = descendants(os.getpid())
        api_pid = next((pid for pid in pids if "demo-api.js" in cmdline(pid)), None)
        if api_pid is None:
            raise BenchError("cannot find the demo API's process among ours")
        report_lua = BENCH / "report.lua"
        targets = [
            Target(
                "A",
                "direct",
                "the demo API itself (Node), valid Authorization header",
                f"{stack.api_url}{PATH}",
                report_lua,
                api_pid,
                headers=(f"Authorization: Bearer {token}",),
            ),
            Target(
                "B",
                "minimal",
                "bench/minimal_proxy.py: aiohttp, fixed Bearer header, reverse mode",
                f"http://127.0.0.1:{minimal_port}{PATH}",
                report_lua,
                minimal.pid,
                headers=(f"Host: {API_HOST}",),
            ),
            Target(
                "C",
                "m2m-host",
                "m2m-proxy, origin-form GET /hello routed by Host: api.demo.local",
                f"http://127.0.0.1:{proxy_port}{PATH}",
                report_lua,
                m2m.pid,
                headers=(f"Host: {API_HOST}",),
            ),
            Target(
                "D",
                "m2m-forward",
                "m2m-proxy, absolute-form GET http://api.demo.local/hello (HTTP_PROXY clients)",
                f"http://127.0.0.1:{proxy_port}/",
                BENCH / "forward.lua",
                m2m.pid,
                env=(("BENCH_FORWARD_URL", FORWARD_URL),),
            ),
        ]
        the_rig = Rig(
            stack,
            token,
            m2m,
            minimal,
            logs,
            targets,
            pids,
            proxy_port,
            workdir=tmp,
            https=https_files,
        )

        try:
            wait_proxy_ready(m2m, f"http://127.0.0.1:{admin_port}/readyz", ready_timeout_s)
        except DevStackError as err:
            raise BenchError(f"m2m-proxy: {err}\n{the_rig.stderr_of('m2m-proxy')}") from err
        wait_ready(
            "minimal proxy",
            minimal,
            lambda: check_target("B minimal", targets[1].url, {"Host": API_HOST}),
            logs["minimal proxy"],
            ready_timeout_s,
        )
        # One request each, as wrk will send it: 200 from the demo API, one token, our client.
        check_target("A direct", targets[0].url, {"Authorization": f"Bearer {token}"})
        check_target("C m2m-host", targets[2].url, {"Host": API_HOST})
        check_target("D m2m-forward", FORWARD_URL, {}, proxy=f"http://127.0.0.1:{proxy_port}")
        yield the_rig
