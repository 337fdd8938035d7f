"""`make run`'s launcher with routes.example.yaml: the banner's command works, Ctrl-C
stops everything. Ports are moved off the defaults so a running dev stack does not clash."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from tests.functional.conftest import ROOT
from tests.functional.support import free_port


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_make_run_banner_command_works_and_ctrl_c_stops_everything(tmp_path: Path) -> None:
    idp, api, proxy, admin = (free_port() for _ in range(4))
    example = (ROOT / "routes.example.yaml").read_text()
    for old, new in (("9400", idp), ("9500", api), ("8080", proxy), ("9901", admin)):
        example = example.replace(f"127.0.0.1:{old}", f"127.0.0.1:{new}")
    config = tmp_path / "routes.yaml"
    config.write_text(example)
    launcher = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "deploy" / "dev_stack.py"),
            "--proxy-config",
            str(config),
            "--python",
            sys.executable,
            "--idp-port",
            str(idp),
            "--api-port",
            str(api),
            "--proxy-url",
            f"http://127.0.0.1:{proxy}",
            "--proxy-admin-url",
            f"http://127.0.0.1:{admin}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={k: v for k, v in os.environ.items() if "proxy" not in k.lower()},
    )
    try:
        assert launcher.stdout is not None
        banner: list[str] = []
        deadline = time.monotonic() + 60
        for line in launcher.stdout:
            banner.append(line)
            if "Ctrl-C stops everything" in line or time.monotonic() > deadline:
                break
        [command] = [ln.split("#")[0].split() for ln in banner if ln.strip().startswith("curl -x")]
        result = subprocess.run(
            [*command, "-sS", "--fail-with-body"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert result.returncode == 0, result.stderr + result.stdout
        answer = json.loads(result.stdout)
        assert answer["client_id"] == "demo-basic"
        assert answer["aud"] == "http://api.demo.local"
        launcher.send_signal(signal.SIGINT)
        assert launcher.wait(timeout=20) == 0
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
        if launcher.stdout is not None:
            launcher.stdout.close()
    for port in (idp, api, proxy, admin):
        assert not _port_open(port), f"port {port} still open after Ctrl-C"
