"""proxy.py plugin for the benchmark: what m2m-proxy's route does, in forward mode.

Every request gets ``Authorization: Bearer $BENCH_TOKEN`` (replacing any the client sent),
and a connection for ``$BENCH_ROUTE_HOST`` (api.demo.local, which does not resolve) goes to
the route's upstream ``$BENCH_UPSTREAM_HOST:$BENCH_UPSTREAM_PORT`` (the demo API) instead,
as m2m-proxy's ``upstream:`` does; the request line and Host header stay as the client sent
them. Loaded by ``proxy --plugins proxypy_plugin.AddToken`` with bench/ on PYTHONPATH
(bench/proxypy.py), in proxy.py's own venv; the project's venv has no proxy.py, so for the
type checker the base class is ``object``.

proxy.py calls ``before_upstream_connection`` once per client connection (it opens one
upstream connection per client connection and keeps it) and ``handle_client_request`` for
every request, the first and the keep-alive ones after it.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    _Base = object
else:
    from proxy.http.proxy import HttpProxyBasePlugin as _Base


class AddToken(_Base):
    """Point the route's host at the upstream and set the bearer token."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.authorization = f"Bearer {os.environ['BENCH_TOKEN']}".encode()
        self.route_host = os.environ["BENCH_ROUTE_HOST"].encode()
        self.upstream_host = os.environ.get("BENCH_UPSTREAM_HOST", "127.0.0.1").encode()
        self.upstream_port = int(os.environ["BENCH_UPSTREAM_PORT"])

    def before_upstream_connection(self, request: Any) -> Any:
        if request.host == self.route_host:
            request.host = self.upstream_host
            request.port = self.upstream_port
        return request

    def handle_client_request(self, request: Any) -> Any:
        request.del_header(b"Authorization")  # if the client sent one
        request.add_header(b"Authorization", self.authorization)
        return request
