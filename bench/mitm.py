"""mitmproxy for the HTTPS-interception comparison: installed into its own venv
(bench/.venv-mitm, git-ignored) on first use, and the ``mitmdump`` command line.

Its own venv because mitmproxy pins its dependencies (cryptography, h11, ...) to versions
that need not match the project's. Installed with pip from PyPI, once; later runs reuse it
while the version and the interpreter are the same (a stamp file records both).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from scenario import BENCH, MITM_VENV, ROOT, BenchError

ADDON = BENCH / "mitm_addon.py"
_STAMP = MITM_VENV / ".bench-installed"
_INSTALL_TIMEOUT_S = 600


def ensure_mitmproxy(python: str, version: str) -> Path:
    """The path of mitmdump ``version`` in bench/.venv-mitm, made with ``python``."""
    mitmdump = MITM_VENV / "bin" / "mitmdump"
    wanted = f"mitmproxy=={version} python={python}\n"
    if mitmdump.exists() and _STAMP.exists() and _STAMP.read_text(encoding="utf-8") == wanted:
        return mitmdump
    print(
        f"bench: installing mitmproxy=={version} into {MITM_VENV.relative_to(ROOT)} "
        "(once; about 20 s) ...",
        flush=True,
    )
    pip = [str(MITM_VENV / "bin" / "python"), "-m", "pip"]
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    for argv in (
        [python, "-m", "venv", "--clear", str(MITM_VENV)],
        [*pip, "install", "--quiet", f"mitmproxy=={version}"],
    ):
        result = subprocess.run(
            argv, env=env, capture_output=True, text=True, timeout=_INSTALL_TIMEOUT_S, check=False
        )
        if result.returncode != 0:
            output = "\n".join((result.stdout + result.stderr).strip().splitlines()[-15:])
            raise BenchError(
                f"{' '.join(argv)} failed ({result.returncode}):\n{output}\n"
                "(mitmproxy 11.1 and newer need Python >= 3.12: pick the version with "
                "--mitmproxy-version and the interpreter with --mitmproxy-python)"
            )
    if mitmproxy_version(mitmdump) != version:
        raise BenchError(f"{mitmdump} --version does not report mitmproxy {version}")
    _STAMP.write_text(wanted, encoding="utf-8")
    return mitmdump


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
