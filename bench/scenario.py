"""The fixed scenario every bench mode measures: where things are, the demo client and route
m2m-proxy serves, and :class:`BenchError`.

Plain constants, no I/O: every other bench module imports them from here.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"

API_HOST = "api.demo.local"
RESOURCE = "http://api.demo.local"
CLIENT_ID = "demo-basic"
SCOPE = "read"
PATH = "/hello"
FORWARD_URL = f"http://{API_HOST}{PATH}"  # the absolute-form target of D m2m-forward
# Long enough that no token expires during a run: all targets then use one token each, and
# the minimal proxy's fixed header stays valid however long --duration/--reps make the run.
TOKEN_TTL_S = 3600
READY_TIMEOUT_S = 30.0

# The HTTPS-interception comparison (bench/https.py): clients CONNECT to TLS_HOST:443; each
# proxy terminates TLS with a leaf from its own CA and sends the decrypted GET to the demo API
# served over TLS (bench/tls_demo_api.mjs), which is the route's `upstream:`.
TLS_HOST = "api-tls.demo.local"
TLS_AUTHORITY = f"{TLS_HOST}:443"
# mitmproxy 11.1+ requires Python >= 3.12; 11.0.2 is the newest release that runs on 3.11,
# the project's Python. bench/.venv-mitm is its own venv (mitmproxy pins its dependencies).
MITMPROXY_VERSION = "11.0.2"
MITM_VENV = BENCH / ".venv-mitm"

# The peers of the wrk part (bench/nginx.py, bench/proxypy.py): nginx from Debian, proxy.py
# from PyPI in its own venv (2.4.10: the newest release, February 2025), and the fixed rate
# at which every target's latency is measured.
PROXYPY_VERSION = "2.4.10"
PROXYPY_VENV = BENCH / ".venv-proxypy"
PACED_RATE = 1000.0


class BenchError(RuntimeError):
    """The benchmark could not run; the message says why."""
