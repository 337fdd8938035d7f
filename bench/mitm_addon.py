"""mitmproxy addon for the HTTPS-interception benchmark: what m2m-proxy's route does.

Every decrypted request gets ``Authorization: Bearer $BENCH_TOKEN`` (replacing any the
client sent) and goes to the route's upstream, https://$BENCH_UPSTREAM_HOST:$BENCH_UPSTREAM_PORT
(the demo API over TLS, verified by mitmproxy with ``ssl_verify_upstream_trusted_ca``).
Loaded by ``mitmdump -s bench/mitm_addon.py`` (bench/https.py); it imports nothing from
mitmproxy, so the project's venv, which has no mitmproxy, type-checks it too.
"""

from __future__ import annotations

import os
from typing import Any


class AddToken:
    """Rewrite the destination to the upstream and set the bearer token."""

    def __init__(self) -> None:
        self.authorization = f"Bearer {os.environ['BENCH_TOKEN']}"
        self.host = os.environ.get("BENCH_UPSTREAM_HOST", "127.0.0.1")
        self.port = int(os.environ["BENCH_UPSTREAM_PORT"])

    def request(self, flow: Any) -> None:
        request = flow.request
        request.scheme = "https"
        request.host = self.host  # also rewrites the Host header, as m2m-proxy's upstream does
        request.port = self.port
        request.headers["Authorization"] = self.authorization


addons = [AddToken()]
