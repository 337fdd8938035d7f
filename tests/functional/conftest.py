"""Functional fixtures: the real dev stack (oidc-provider IdP and demo API) per session."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from dev_stack import DevStack

from tests.functional.support import SENTINEL_SECRET

ROOT = Path(__file__).resolve().parents[2]
RESOURCE = "http://api.demo.local"


def make_dev_stack(token_ttl_s: int = 300) -> DevStack:
    """The dev IdP and demo API with the test clients (sentinel secret), not yet started."""
    clients = [
        {
            "client_id": client_id,
            "client_secret": SENTINEL_SECRET,
            "token_endpoint_auth_method": method,
        }
        for client_id, method in (
            ("svc-basic", "client_secret_basic"),
            ("svc-post", "client_secret_post"),
        )
    ]
    resources: dict[str, dict[str, object]] = {
        RESOURCE: {"scope": "read write", "ttl_s": token_ttl_s}
    }
    return DevStack(ROOT, clients=clients, resources=resources, token_ttl_s=token_ttl_s)


@pytest.fixture(scope="session")
def dev_stack() -> Iterator[DevStack]:
    with make_dev_stack() as stack:
        yield stack


@pytest.fixture
def stack(dev_stack: DevStack) -> DevStack:
    """The session's dev stack with its request log and revocations cleared."""
    dev_stack.reset()
    return dev_stack


def routes_for(stack: DevStack, extra_proxy: str = "", route_extra: str = "") -> str:
    """A routes file for the dev stack: api.demo.local → demo API, two clients."""
    return f"""
proxy:
  unmatched: deny
{extra_proxy}
clients:
  basic:
    token_url: {stack.token_url}
    client_id: svc-basic
    client_secret: ${{SENTINEL_SECRET}}
  post:
    token_url: {stack.token_url}
    client_id: svc-post
    client_secret: ${{SENTINEL_SECRET}}
    auth_method: client_secret_post
routes:
  - host: api.demo.local
    client: basic
    scope: read write
    resource: {RESOURCE}
    upstream: {stack.api_url}
{route_extra}
  - host: post.demo.local
    client: post
    scope: [read]
    audience: {RESOURCE}
    upstream: {stack.api_url}
"""
