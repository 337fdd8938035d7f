"""Local dev stack for m2m-proxy: the dev IdP and the demo protected API (deploy/dev-idp).

Two ways to use it:

* As a library (integration tests)::

      with DevStack(repo_root) as stack:          # ephemeral ports by default
          stack.token_url, stack.api_url, stack.token_requests(), stack.revoke_current()

* As a script (``make run``)::

      python deploy/dev_stack.py [--proxy-config routes.example.yaml] [--python PATH]

  starts the IdP on 127.0.0.1:9400 and the demo API on 127.0.0.1:9500, optionally the proxy,
  prints how to try it, and stops everything on Ctrl-C / SIGTERM.

Standard library only, so it runs before any project dependency is installed.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, Any, Self

DEV_IDP_SUBDIR = Path("deploy") / "dev-idp"
READY_TIMEOUT_S = 90.0
STOP_GRACE_S = 5.0
HOST = "127.0.0.1"
# The obvious dev default, same as idp.js; override with DEV_CLIENT_SECRET.
DEFAULT_DEV_CLIENT_SECRET = "dev-only-secret"

# Fixed ports for `make run` (tests use ephemeral ports).
RUN_IDP_PORT = 9400
RUN_API_PORT = 9500
RUN_PROXY_URL = "http://127.0.0.1:8080"
RUN_PROXY_ADMIN_URL = "http://127.0.0.1:9901"

# Loopback helpers must never go through HTTP_PROXY from the environment (which may well
# point at the proxy under test).
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class DevStackError(RuntimeError):
    """A dev stack component could not be installed, started or queried."""


def dev_idp_dir(root: Path) -> Path:
    return root / DEV_IDP_SUBDIR


def ensure_node_modules(root: Path) -> None:
    """Run ``npm ci`` in deploy/dev-idp unless its node_modules is already installed.

    ``node_modules/.package-lock.json`` is written by npm at the end of a successful install,
    so an interrupted install is retried too.
    """
    directory = dev_idp_dir(root)
    if (directory / "node_modules" / ".package-lock.json").is_file():
        return
    npm = shutil.which("npm")
    if npm is None:
        raise DevStackError("npm not found on PATH (Node.js 20+ with npm is required)")
    result = subprocess.run(  # noqa: S603 - fixed argv, resolved npm binary
        [npm, "ci", "--no-audit", "--no-fund"],
        cwd=directory,
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise DevStackError(
            f"npm ci in {directory} failed ({result.returncode}):\n{result.stdout}{result.stderr}"
        )


def terminate(proc: subprocess.Popen[Any], grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM one process we started, SIGKILL it if it is still alive after ``grace_s``."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _loopback_opener(ca_file: Path | None) -> urllib.request.OpenerDirector:
    """No HTTP_PROXY; https (the test IdP with IDP_TLS_CERT_FILE) trusts only ``ca_file``."""
    if ca_file is None:
        return _OPENER
    try:
        context = ssl.create_default_context(cafile=str(ca_file))
    except (OSError, ssl.SSLError) as err:
        raise DevStackError(f"cannot load tls_ca_file {ca_file}: {err}") from err
    return urllib.request.build_opener(
        urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context)
    )


def _http_json(
    method: str,
    url: str,
    *,
    opener: urllib.request.OpenerDirector = _OPENER,
    payload: object = None,
) -> Any:
    """``method url`` (with ``payload`` as a JSON body if given); the parsed JSON answer."""
    data = None if payload is None else json.dumps(payload).encode("utf-8")
    headers = {} if data is None else {"Content-Type": "application/json"}
    request = urllib.request.Request(  # noqa: S310 - http(s)://127.0.0.1 only
        url, data=data, headers=headers, method=method
    )
    try:
        with opener.open(request, timeout=10) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as err:
        body = err.read().decode("utf-8", "replace")
        raise DevStackError(f"{method} {url} -> HTTP {err.code}: {body}") from err
    except urllib.error.URLError as err:
        raise DevStackError(f"{method} {url} failed: {err.reason}") from err


class _NodeProcess:
    """One node script: started, its output drained by threads, waited on for its ready line."""

    def __init__(
        self,
        name: str,
        *,
        argv: list[str],
        cwd: Path,
        env: dict[str, str],
        ready_event: str,
        echo: bool,
    ) -> None:
        self.name = name
        self._ready_event_name = ready_event
        self._echo = echo
        self._ready = threading.Event()
        self.ready_line: dict[str, Any] | None = None
        self.stdout_tail: collections.deque[str] = collections.deque(maxlen=200)
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=200)
        # Own session: a terminal Ctrl-C reaches only the launcher, which stops us in order.
        # stdin is a pipe the script watches (EXIT_ON_STDIN_EOF): if the launcher dies
        # without stopping us, the pipe closes and the script exits instead of holding its port.
        self.proc: subprocess.Popen[str] = subprocess.Popen(  # noqa: S603 - fixed argv
            argv,
            cwd=cwd,
            env={**env, "EXIT_ON_STDIN_EOF": "1"},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            encoding="utf-8",
            errors="replace",
            start_new_session=True,
        )
        assert self.proc.stdout is not None  # noqa: S101 - guaranteed by PIPE above
        assert self.proc.stderr is not None  # noqa: S101
        self._threads = [
            threading.Thread(
                target=self._drain_stdout,
                args=(self.proc.stdout,),
                daemon=True,
                name=f"{name}-stdout",
            ),
            threading.Thread(
                target=self._drain_stderr,
                args=(self.proc.stderr,),
                daemon=True,
                name=f"{name}-stderr",
            ),
        ]
        for thread in self._threads:
            thread.start()

    def _drain_stdout(self, stream: IO[str]) -> None:
        for line in stream:
            if self.ready_line is None and line.startswith("{"):
                try:
                    parsed = json.loads(line)
                except ValueError:
                    parsed = None
                if isinstance(parsed, dict) and parsed.get("event") == self._ready_event_name:
                    self.ready_line = parsed
                    self._ready.set()
                    continue
            self._keep(self.stdout_tail, line)

    def _drain_stderr(self, stream: IO[str]) -> None:
        for line in stream:
            self._keep(self.stderr_tail, line)

    def _keep(self, tail: collections.deque[str], line: str) -> None:
        tail.append(line)
        if self._echo:
            sys.stderr.write(f"[{self.name}] {line}")
            sys.stderr.flush()

    def output(self) -> str:
        """Recent stderr (and stray stdout) for error messages."""
        for thread in self._threads:
            thread.join(timeout=1.0)  # the process is gone: let the drains reach EOF
        text = "".join(self.stderr_tail) + "".join(self.stdout_tail)
        return text.strip() or "(no output)"

    def wait_ready(self, timeout_s: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while not self._ready.wait(0.05):
            code = self.proc.poll()
            if code is not None:
                raise DevStackError(
                    f"{self.name} exited with code {code} before it was ready:\n{self.output()}"
                )
            if time.monotonic() > deadline:
                terminate(self.proc)
                raise DevStackError(
                    f"{self.name} not ready after {timeout_s:.0f}s:\n{self.output()}"
                )
        assert self.ready_line is not None  # noqa: S101 - set before the event
        return self.ready_line

    def stop(self) -> None:
        terminate(self.proc)
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        for thread in self._threads:
            thread.join(timeout=2.0)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


class DevStack:
    """The dev IdP (oidc-provider) and the demo API as subprocesses; a context manager.

    ``clients``, ``resources`` and ``token_ttl_s`` become IDP_CLIENTS, IDP_RESOURCES and
    IDP_TOKEN_TTL_S (see deploy/dev-idp/README.md); left as None, the IdP's defaults (or
    those variables from ``env`` / the environment) apply. ``env`` is added to the inherited
    environment of both processes (e.g. DEV_CLIENT_SECRET). ``api_audience`` defaults to the
    first ``resources`` key when resources are given. Port 0 means an ephemeral port.

    mTLS (RFC 8705, tests only): ``tls_cert_file`` / ``tls_key_file`` (PEM, for 127.0.0.1)
    become IDP_TLS_CERT_FILE / IDP_TLS_KEY_FILE: the issuer is then https and a second
    listener (``mtls_token_url``) asks for client certificates. ``tls_client_ca_file``
    (IDP_TLS_CLIENT_CA_FILE) is the CA that tls_client_auth certificates must chain to.
    ``tls_ca_file``, required with ``tls_cert_file``, is the CA that signed the IdP's server
    certificate: the /__test helpers trust it, and so does the demo API (NODE_EXTRA_CA_CERTS)
    when it fetches the IdP's JWKS.
    """

    def __init__(  # noqa: PLR0917 - positional signature shared with the test suite
        self,
        root: Path,
        idp_port: int = 0,
        api_port: int = 0,
        clients: list[dict[str, Any]] | None = None,
        resources: dict[str, dict[str, object]] | None = None,
        token_ttl_s: int | None = None,
        env: dict[str, str] | None = None,
        *,
        api_audience: str | None = None,
        api_required_scope: str | None = None,
        node: str = "node",
        echo_logs: bool = False,
        tls_cert_file: Path | None = None,
        tls_key_file: Path | None = None,
        tls_client_ca_file: Path | None = None,
        tls_ca_file: Path | None = None,
    ) -> None:
        if (tls_cert_file is None) != (tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together")
        if tls_cert_file is None and (tls_client_ca_file or tls_ca_file) is not None:
            raise ValueError("tls_client_ca_file and tls_ca_file need tls_cert_file")
        if tls_cert_file is not None and tls_ca_file is None:
            raise ValueError("tls_cert_file needs tls_ca_file (the CA that signed it)")
        self.root = root
        self.idp_port = idp_port
        self.api_port = api_port
        self.clients = clients
        self.resources = resources
        self.token_ttl_s = token_ttl_s
        self.env = dict(env or {})
        self.api_audience = api_audience
        self.api_required_scope = api_required_scope
        self.node = node
        self.echo_logs = echo_logs
        # Absolute: the node processes run in deploy/dev-idp.
        self.tls_cert_file = tls_cert_file and tls_cert_file.resolve()
        self.tls_key_file = tls_key_file and tls_key_file.resolve()
        self.tls_client_ca_file = tls_client_ca_file and tls_client_ca_file.resolve()
        self.tls_ca_file = tls_ca_file and tls_ca_file.resolve()
        self._opener = _OPENER
        self._idp: _NodeProcess | None = None
        self._api: _NodeProcess | None = None
        self._issuer: str | None = None
        self._token_url: str | None = None
        self._mtls_token_url: str | None = None
        self._api_url: str | None = None

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> Self:
        if self._idp is not None:
            raise DevStackError("DevStack already started")
        ensure_node_modules(self.root)
        node = shutil.which(self.node)
        if node is None:
            raise DevStackError(f"{self.node!r} not found on PATH (Node.js 20+ is required)")
        directory = dev_idp_dir(self.root)
        base_env = {**os.environ, **self.env}
        self._opener = _loopback_opener(self.tls_ca_file)
        try:
            self._idp = _NodeProcess(
                "idp",
                argv=[node, "idp.js"],
                cwd=directory,
                env={**base_env, **self._idp_env()},
                ready_event="idp_ready",
                echo=self.echo_logs,
            )
            ready = self._idp.wait_ready(READY_TIMEOUT_S)
            self._issuer = str(ready["issuer"])
            self._token_url = str(ready["token_url"])
            mtls_token_url = ready.get("mtls_token_url")
            self._mtls_token_url = None if mtls_token_url is None else str(mtls_token_url)
            self._api = _NodeProcess(
                "demo-api",
                argv=[node, "demo-api.js"],
                cwd=directory,
                env={**base_env, **self._api_env(self._issuer)},
                ready_event="demo_api_ready",
                echo=self.echo_logs,
            )
            self._api_url = str(self._api.wait_ready(READY_TIMEOUT_S)["url"])
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop both processes (SIGTERM, SIGKILL after 5 s). Safe to call more than once."""
        for process in (self._api, self._idp):
            if process is not None:
                process.stop()
        self._api = self._idp = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _idp_env(self) -> dict[str, str]:
        env = {"IDP_HOST": HOST, "IDP_PORT": str(self.idp_port)}
        if self.clients is not None:
            env["IDP_CLIENTS"] = json.dumps(self.clients)
        if self.resources is not None:
            env["IDP_RESOURCES"] = json.dumps(self.resources)
        if self.token_ttl_s is not None:
            env["IDP_TOKEN_TTL_S"] = str(self.token_ttl_s)
        for name, path in (
            ("IDP_TLS_CERT_FILE", self.tls_cert_file),
            ("IDP_TLS_KEY_FILE", self.tls_key_file),
            ("IDP_TLS_CLIENT_CA_FILE", self.tls_client_ca_file),
        ):
            if path is not None:
                env[name] = str(path)
        return env

    def _api_env(self, issuer: str) -> dict[str, str]:
        env = {"DEMO_HOST": HOST, "DEMO_PORT": str(self.api_port), "IDP_ISSUER": issuer}
        audience = self.api_audience
        if audience is None and self.resources:
            audience = next(iter(self.resources))
        if audience is not None:
            env["DEMO_AUDIENCE"] = audience
        if self.api_required_scope is not None:
            env["DEMO_REQUIRED_SCOPE"] = self.api_required_scope
        if self.tls_ca_file is not None:
            # An https issuer: demo-api.js fetches discovery and JWKS with Node's fetch.
            env["NODE_EXTRA_CA_CERTS"] = str(self.tls_ca_file)
        return env

    # -- addresses ------------------------------------------------------------------------

    @property
    def issuer(self) -> str:
        return self._started(self._issuer)

    @property
    def token_url(self) -> str:
        return self._started(self._token_url)

    @property
    def mtls_token_url(self) -> str | None:
        """The token endpoint of the mTLS listener, or None without ``tls_cert_file``."""
        self._started(self._issuer)
        return self._mtls_token_url

    @property
    def api_url(self) -> str:
        return self._started(self._api_url)

    @property
    def dev_client_secret(self) -> str:
        """The secret of the default clients (DEV_CLIENT_SECRET or the dev default)."""
        return (
            self.env.get("DEV_CLIENT_SECRET")
            or os.environ.get("DEV_CLIENT_SECRET")
            or DEFAULT_DEV_CLIENT_SECRET
        )

    @staticmethod
    def _started(value: str | None) -> str:
        if value is None:
            raise DevStackError("DevStack is not started")
        return value

    def failed(self) -> str | None:
        """Describe a component that died after start, or None if both are running."""
        for process in (self._idp, self._api):
            if process is not None and process.proc.poll() is not None:
                return (
                    f"{process.name} exited with code {process.proc.returncode}:\n"
                    f"{process.output()}"
                )
        return None

    # -- test helpers ---------------------------------------------------------------------

    def token_requests(self) -> list[dict[str, Any]]:
        """Every request the IdP's token endpoint received since start / the last reset()."""
        data = _http_json("GET", f"{self.issuer}/__test/token-requests", opener=self._opener)
        if not isinstance(data, list):
            raise DevStackError(f"unexpected token-requests answer: {data!r}")
        return data

    def reset(self) -> None:
        """Clear the IdP's request log and the API's counters and revocations."""
        _http_json("POST", f"{self.issuer}/__test/reset", opener=self._opener)
        _http_json("POST", f"{self.api_url}/__test/reset")

    def rotate_secret(self, client_id: str, secret: str) -> None:
        """Replace a client's secret at the IdP; from now on only ``secret`` authenticates it."""
        quoted = urllib.parse.quote(client_id, safe="")
        _http_json(
            "POST",
            f"{self.issuer}/__test/clients/{quoted}/secret",
            opener=self._opener,
            payload={"client_secret": secret},
        )

    def revoke_current(self) -> str:
        """Revoke the most recently accepted token at the API; returns its jti."""
        data = _http_json("POST", f"{self.api_url}/__test/revoke-current")
        return str(data["revoked"])

    def api_stats(self) -> dict[str, Any]:
        """{"accepted": n, "rejected_401": n, "rejected_403": n, "revoked": [jti, ...]}"""
        data = _http_json("GET", f"{self.api_url}/__test/stats")
        if not isinstance(data, dict):
            raise DevStackError(f"unexpected stats answer: {data!r}")
        return data


# -- `python deploy/dev_stack.py`: the `make run` entry point ---------------------------------


def start_proxy(python: str, config: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """Start ``python -m m2m_proxy run --config FILE``; its logs go to our stdout/stderr."""
    return subprocess.Popen(  # noqa: S603 - argv from the launcher's own options
        [python, "-m", "m2m_proxy", "run", "--config", str(config)],
        env=env,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )


def wait_proxy_ready(proxy: subprocess.Popen[bytes], readyz_url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        code = proxy.poll()
        if code is not None:
            raise DevStackError(f"proxy exited with code {code} before it was ready")
        try:
            with _OPENER.open(readyz_url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass  # not listening yet, or answering 503 while it warms up
        if time.monotonic() > deadline:
            raise DevStackError(f"proxy not ready at {readyz_url} after {timeout_s:.0f}s")
        time.sleep(0.2)


def _banner(stack: DevStack, proxy_url: str | None, admin_url: str) -> str:
    secret_hint = (
        "$DEV_CLIENT_SECRET" if os.environ.get("DEV_CLIENT_SECRET") else DEFAULT_DEV_CLIENT_SECRET
    )
    lines = [
        "",
        "m2m-proxy dev stack is up",
        f"  IdP       {stack.issuer}  (token endpoint {stack.token_url})",
        f"  demo API  {stack.api_url}  (audience http://api.demo.local, needs scope read)",
        "  clients   demo-basic (client_secret_basic), demo-post (client_secret_post),"
        f" secret {secret_hint}",
    ]
    if proxy_url is not None:
        lines += [
            f"  proxy     {proxy_url}  (admin {admin_url})",
            "",
            "Try:",
            f"  curl -x {proxy_url} http://api.demo.local/hello   # 200: the proxy adds a token",
            f"  curl -i {stack.api_url}/hello                      # 401: no token",
        ]
    else:
        lines += [
            "",
            "No proxy started (pass --proxy-config FILE). By hand:",
            f"  curl -s -u demo-basic:{secret_hint} -d grant_type=client_credentials"
            f" -d scope=read {stack.token_url}",
            f'  curl -H "Authorization: Bearer $TOKEN" {stack.api_url}/hello   # 200',
            f"  curl -i {stack.api_url}/hello                                   # 401: no token",
        ]
    lines += ["", "Ctrl-C stops everything.", ""]
    return "\n".join(lines)


def _raise_interrupt(_signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--proxy-config", type=Path, help="also start the proxy with this file")
    parser.add_argument("--python", default=sys.executable, help="interpreter for the proxy")
    parser.add_argument("--idp-port", type=int, default=RUN_IDP_PORT)
    parser.add_argument("--api-port", type=int, default=RUN_API_PORT)
    parser.add_argument("--proxy-url", default=RUN_PROXY_URL, help="for the banner only")
    parser.add_argument("--proxy-admin-url", default=RUN_PROXY_ADMIN_URL)
    args = parser.parse_args(argv)

    root = Path(__file__).resolve().parent.parent
    # The IdP and the proxy must agree on the dev clients' secret.
    secret = os.environ.get("DEV_CLIENT_SECRET") or DEFAULT_DEV_CLIENT_SECRET
    stack = DevStack(
        root,
        idp_port=args.idp_port,
        api_port=args.api_port,
        env={"DEV_CLIENT_SECRET": secret},
        echo_logs=True,
    )
    proxy: subprocess.Popen[bytes] | None = None
    # Ctrl-C and SIGTERM both unwind through the finally below and stop everything we
    # started. SIGINT is set explicitly: a shell's background job inherits it as ignored.
    signal.signal(signal.SIGINT, _raise_interrupt)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        stack.start()
        if args.proxy_config is not None:
            proxy = start_proxy(
                args.python,
                args.proxy_config.resolve(),
                {
                    **os.environ,
                    "DEV_CLIENT_SECRET": secret,
                    "DEV_IDP_ISSUER": stack.issuer,
                    "DEV_IDP_TOKEN_URL": stack.token_url,
                    "DEV_API_URL": stack.api_url,
                },
            )
            wait_proxy_ready(proxy, f"{args.proxy_admin_url}/readyz", READY_TIMEOUT_S)
        print(_banner(stack, args.proxy_url if proxy else None, args.proxy_admin_url), flush=True)
        while True:
            time.sleep(0.5)
            problem = stack.failed()
            if problem is None and proxy is not None and proxy.poll() is not None:
                problem = f"proxy exited with code {proxy.returncode}"
            if problem is not None:
                print(f"dev stack: {problem}", file=sys.stderr)
                return 1
    except KeyboardInterrupt:
        return 0
    except DevStackError as err:
        print(f"dev stack: {err}", file=sys.stderr)
        return 1
    finally:
        # A second Ctrl-C must not abandon the children half-stopped.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if proxy is not None:
            terminate(proxy)
        stack.stop()


if __name__ == "__main__":
    sys.exit(main())
