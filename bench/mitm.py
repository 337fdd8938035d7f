"""mitmproxy for the HTTPS-interception comparison: installed into its own venv
(bench/.venv-mitm, git-ignored) on first use, and the ``mitmdump`` command line.

Its own venv because mitmproxy pins its dependencies (cryptography, h11, ...) to versions
that need not match the project's (bench/install.py: installed with pip from PyPI, once).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from install import ensure_venv
from scenario import BENCH, MITM_VENV

ADDON = BENCH / "mitm_addon.py"


def ensure_mitmproxy(python: str, version: str) -> Path:
    """The path of mitmdump ``version`` in bench/.venv-mitm, made with ``python``."""

    def check(mitmdump: Path) -> str | None:
        if mitmproxy_version(mitmdump) != version:
            return f"{mitmdump} --version does not report mitmproxy {version}"
        return None

    return ensure_venv(
        MITM_VENV,
        f"mitmproxy=={version}",
        python,
        "mitmdump",
        check=check,
        hint="(mitmproxy 11.1 and newer need Python >= 3.12: pick the version with "
        "--mitmproxy-version and the interpreter with --mitmproxy-python)",
    )


def mitmproxy_version(mitmdump: Path) -> str:
    """The version mitmdump reports ("?" if it does not run)."""
    result = subprocess.run(
        [str(mitmdump), "--version"], capture_output=True, text=True, timeout=60, check=False
    )
    for line in result.stdout.splitlines():
        name, _, value = line.partition(":")
        if name.strip() == "Mitmproxy":
            return value.strip()
    return "?"


def mitmdump_argv(mitmdump: Path, port: int, confdir: Path, upstream_ca: Path) -> list[str]:
    """mitmdump as a regular (CONNECT) proxy on 127.0.0.1:``port`` doing m2m-proxy's job.

    - its own CA, made in ``confdir`` at first start (clients trust
      ``confdir/mitmproxy-ca-cert.pem``), leaves minted and cached per host;
    - ``upstream_cert=false`` and ``connection_strategy=lazy``: like m2m-proxy, the leaf
      is minted from the CONNECT host / SNI without first connecting upstream, and the
      upstream connection is opened for the first request (the addon has rewritten its
      destination by then: the CONNECT host does not resolve);
    - the upstream's certificate verified against ``upstream_ca``, as m2m-proxy does;
    - ``--quiet``: no per-flow output (m2m-proxy writes its access-log line to /dev/null).
    """
    return [
        str(mitmdump),
        "--quiet",
        "--listen-host",
        "127.0.0.1",
        "--listen-port",
        str(port),
        "--set",
        f"confdir={confdir}",
        "--set",
        "upstream_cert=false",
        "--set",
        "connection_strategy=lazy",
        "--set",
        f"ssl_verify_upstream_trusted_ca={upstream_ca}",
        "--scripts",
        str(ADDON),
    ]
