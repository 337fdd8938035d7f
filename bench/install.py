"""Installing what the benchmark runs but the project does not depend on: a Debian package
with apt-get (wrk, nginx; as root, when the command is missing), or a PyPI package into a
venv of its own under bench/ (mitmproxy, proxy.py; once, then reused while the version and
the interpreter are the same: a stamp file records both).

Own venvs because those tools pin their dependencies to versions that need not match the
project's.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

from scenario import ROOT, BenchError

_INSTALL_TIMEOUT_S = 600
_STAMP = ".bench-installed"


def _which(command: str) -> str | None:
    # nginx lives in /usr/sbin, which is not on every user's PATH.
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    return shutil.which(command, path=path)


def ensure_apt(command: str, package: str) -> str:
    """Path of ``command``; ``package`` installed with apt-get when it is missing and we are
    root (BenchError saying what to install otherwise)."""
    found = _which(command)
    if found is not None:
        return found
    if os.geteuid() != 0:
        raise BenchError(
            f"{command} is not installed and we are not root; install it "
            f"(Debian/Ubuntu: sudo apt-get install {package}) and run again"
        )
    if shutil.which("apt-get") is None:
        raise BenchError(f"{command} is not installed and there is no apt-get; install {package}")
    print(f"bench: {command} not found, installing {package} with apt-get ...", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", package]):
        result = subprocess.run(
            argv, env=env, capture_output=True, text=True, timeout=_INSTALL_TIMEOUT_S, check=False
        )
        if result.returncode != 0:
            raise BenchError(f"{' '.join(argv)} failed:\n{result.stdout}{result.stderr}")
    found = _which(command)
    if found is None:
        raise BenchError(f"apt-get installed {package} but {command} is not on PATH")
    return found


def ensure_venv(
    venv: Path,
    requirement: str,
    python: str,
    executable: str,
    *,
    check: Callable[[Path], str | None] | None = None,
    hint: str = "",
) -> Path:
    """The path of ``executable`` in ``venv``, made with ``python`` and ``pip install
    requirement`` unless it is there already from the same requirement and interpreter.
    ``check``, after an install, returns a problem with the new executable (None if fine);
    ``hint`` is added to the message of a failed install."""
    path = venv / "bin" / executable
    stamp = venv / _STAMP
    wanted = f"{requirement} python={python}\n"
    if path.exists() and stamp.exists() and stamp.read_text(encoding="utf-8") == wanted:
        return path
    print(
        f"bench: installing {requirement} into {venv.relative_to(ROOT)} (once; about 20 s) ...",
        flush=True,
    )
    pip = [str(venv / "bin" / "python"), "-m", "pip"]
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    for argv in (
        [python, "-m", "venv", "--clear", str(venv)],
        [*pip, "install", "--quiet", requirement],
    ):
        result = subprocess.run(
            argv, env=env, capture_output=True, text=True, timeout=_INSTALL_TIMEOUT_S, check=False
        )
        if result.returncode != 0:
            output = "\n".join((result.stdout + result.stderr).strip().splitlines()[-15:])
            raise BenchError(f"{' '.join(argv)} failed ({result.returncode}):\n{output}\n{hint}")
    problem = None if check is None else check(path)
    if problem is not None:
        raise BenchError(problem)
    stamp.write_text(wanted, encoding="utf-8")
    return path
