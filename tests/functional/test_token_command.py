"""`m2m-proxy token`: route, client and the decoded token, against the real IdP."""

from __future__ import annotations

import sys
from pathlib import Path

from dev_stack import DevStack

from tests.functional.conftest import RESOURCE, routes_for
from tests.functional.support import SENTINEL_SECRET, run_cli


async def test_token_command_shows_route_client_and_claims_not_the_token(
    stack: DevStack, tmp_path: Path
) -> None:
    config = tmp_path / "routes.yaml"
    config.write_text(routes_for(stack))
    env = {"SENTINEL_SECRET": SENTINEL_SECRET}
    argv = [sys.executable, "-m", "m2m_proxy", "token", "--config", str(config)]
    code, out, err = await run_cli(*argv, "api.demo.local/orders", env=env)
    assert code == 0, err
    assert "route     api.demo.local" in out
    assert "client    basic (client_id svc-basic, client_secret_basic)" in out
    assert f"claim     aud = {RESOURCE}" in out
    assert "token     (hidden; --show-token prints it)" in out
    assert "eyJ" not in out and SENTINEL_SECRET not in out + err
    code, shown, _ = await run_cli(*argv, "api.demo.local", "--show-token", env=env)
    assert code == 0
    assert "token     eyJ" in shown
    code, _, err = await run_cli(*argv, "unknown.example", env=env)
    assert code == 1
    assert "no route matches host 'unknown.example'" in err
    assert len(stack.token_requests()) == 2
