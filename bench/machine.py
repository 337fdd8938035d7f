"""Facts about the machine, the versions that matter, and the git checkout, for the reports."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from collections.abc import Sequence
from typing import Any

from scenario import ROOT, BenchError


def _command_output(argv: Sequence[str]) -> str:
    try:
        result = subprocess.run(list(argv), capture_output=True, text=True, check=False)
    except OSError:
        return "?"
    return (result.stdout or result.stderr).strip()


def machine_info(python: str, wrk: str | None) -> dict[str, Any]:
    """The machine and the versions that matter; ``wrk`` None: valgrind's version instead.
    Raises BenchError when ``python`` cannot import the proxies' packages."""
    cpu_model = "?"
    with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    probe = (
        "import json, platform; from importlib.metadata import version as v; "
        "print(json.dumps({'python': platform.python_version(), 'aiohttp': v('aiohttp'), "
        "'uvloop': v('uvloop'), 'structlog': v('structlog'), 'yarl': v('yarl'), "
        "'multidict': v('multidict')}))"
    )
    answer = _command_output([python, "-c", probe])
    try:
        versions = json.loads(answer)
    except ValueError:
        last = answer.splitlines()[-1:] or ["(no output)"]
        raise BenchError(f"{python} cannot run the proxies ({last[0]}); use the venv") from None
    return {
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model,
        "kernel": platform.release(),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
        **versions,
        "node": _command_output(["node", "--version"]),
        **(
            {"valgrind": _command_output(["valgrind", "--version"])}
            if wrk is None
            else {"wrk": _command_output([wrk, "-v"]).splitlines()[0].split(" [")[0]}
        ),
    }


def git_info() -> dict[str, Any]:
    """The short HEAD commit, and whether src/ differs from it."""
    head = _command_output(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    dirty = _command_output(["git", "-C", str(ROOT), "status", "--porcelain", "--", "src"])
    return {"commit": head, "src_modified": bool(dirty)}
