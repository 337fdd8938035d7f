"""Container health check for m2m-proxy: GET a path of the admin listener over loopback.

    python /opt/m2m-proxy/healthcheck.py [/healthz | /readyz]     (default /healthz)

Exit 0 when the answer is 200, else 1 (what Docker's HEALTHCHECK and compose expect).
The port is that of M2M_PROXY_ADMIN_LISTEN (``host:port`` or a bare port) when it is set,
else the default 9901: a container that moves the admin listener in its routes file
instead must set M2M_PROXY_ADMIN_LISTEN too. A wildcard host (0.0.0.0, ::) is checked on
loopback, any other host as given. Standard library only; never goes through a proxy
(http.client ignores HTTP_PROXY).
"""

from __future__ import annotations

import http.client
import os
import sys

DEFAULT_PORT = 9901
TIMEOUT_S = 3.0
WILDCARDS = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}


def admin_address(value: str) -> tuple[str, int]:
    """``host:port``, ``[v6]:port`` or a bare port, as M2M_PROXY_ADMIN_LISTEN takes them."""
    value = value.strip()
    if not value:
        return "127.0.0.1", DEFAULT_PORT
    if value.isdecimal():
        return "127.0.0.1", int(value)
    host, _, port = value.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    return WILDCARDS.get(host, host), int(port)


def main(argv: list[str]) -> int:
    path = argv[1] if len(argv) > 1 else "/healthz"
    try:
        host, port = admin_address(os.environ.get("M2M_PROXY_ADMIN_LISTEN", ""))
    except ValueError:
        print("M2M_PROXY_ADMIN_LISTEN is not host:port", file=sys.stderr)
        return 1
    connection = http.client.HTTPConnection(host, port, timeout=TIMEOUT_S)
    try:
        connection.request("GET", path, headers={"User-Agent": "m2m-proxy-healthcheck"})
        response = connection.getresponse()
        body = response.read(512).decode("utf-8", "replace")
    except OSError as exc:
        print(f"{host}:{port}{path}: {exc}", file=sys.stderr)
        return 1
    finally:
        connection.close()
    print(f"{path}: {response.status} {body.strip()}")
    return 0 if response.status == 200 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
