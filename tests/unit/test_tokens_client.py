"""TokenClient: the request it builds and how it treats each kind of IdP answer.

``fetch`` runs against a small aiohttp IdP on 127.0.0.1 port 0 that records what it
received, so the tests assert the Basic header and form the IdP actually got.
"""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import parse_qsl, unquote_plus

import aiohttp
import pytest
from aiohttp import web

from m2m_proxy.config import AuthMethod, ClientConfig, CredentialSpec, Secret
from m2m_proxy.errors import (
    TokenError,
    TokenRejectedError,
    TokenResponseInvalidError,
    TokenTimeoutError,
    TokenUnavailableError,
)
from m2m_proxy.tokens.client import TokenClient, build_request
from m2m_proxy.tokens.material import ClientMaterial

TRICKY_SECRET = "p:s+ %é/="
TOKEN_URL = "https://idp.example.com/token"
PLAIN_SECRET = "s3cret"


def client_config(
    *,
    token_url: str = TOKEN_URL,
    client_id: str = "orders-id",
    secret: str = PLAIN_SECRET,
    method: AuthMethod = AuthMethod.CLIENT_SECRET_BASIC,
    token_params: tuple[tuple[str, str], ...] = (),
) -> ClientConfig:
    return ClientConfig(
        name="orders",
        token_url=token_url,
        client_id=client_id,
        client_secret=Secret(secret),
        auth_method=method,
        token_params=token_params,
    )


def basic_pair(headers: dict[str, str]) -> tuple[str, str]:
    """The still form-encoded (id, secret) of a Basic header."""
    scheme, _, encoded = headers["Authorization"].partition(" ")
    assert scheme == "Basic"
    user, sep, password = base64.b64decode(encoded, validate=True).decode("ascii").partition(":")
    assert sep == ":"
    return user, password


# --- build_request (pure) -------------------------------------------------------------


def test_basic_auth_form_encodes_id_and_secret_before_base64() -> None:
    form, headers = build_request(
        client_config(client_id="id:1 é", secret=TRICKY_SECRET), CredentialSpec(client="orders")
    )
    user, password = basic_pair(headers)
    assert user == "id%3A1+%C3%A9"
    assert password == "p%3As%2B+%25%C3%A9%2F%3D"
    assert (unquote_plus(user), unquote_plus(password)) == ("id:1 é", TRICKY_SECRET)
    assert "client_id" not in form
    assert "client_secret" not in form


def test_basic_auth_with_plain_credentials_is_the_usual_header() -> None:
    _, headers = build_request(client_config(), CredentialSpec(client="orders"))
    assert headers["Authorization"] == "Basic " + base64.b64encode(b"orders-id:s3cret").decode()


def test_client_secret_post_puts_id_and_secret_in_the_form() -> None:
    form, headers = build_request(
        client_config(method=AuthMethod.CLIENT_SECRET_POST, secret=TRICKY_SECRET),
        CredentialSpec(client="orders"),
    )
    assert form == {
        "grant_type": "client_credentials",
        "client_id": "orders-id",
        "client_secret": TRICKY_SECRET,
    }
    assert "Authorization" not in headers


def test_scope_is_joined_by_spaces_and_audience_and_resource_are_sent() -> None:
    form, headers = build_request(
        client_config(),
        CredentialSpec(
            client="orders",
            scope=("read:orders", "write:shipments"),
            audience="https://api.example.com",
            resource="https://api.example.com/",
        ),
    )
    assert form == {
        "grant_type": "client_credentials",
        "scope": "read:orders write:shipments",
        "audience": "https://api.example.com",
        "resource": "https://api.example.com/",
    }
    assert headers["Accept"] == "application/json"


def test_no_scope_audience_or_resource_fields_when_not_configured() -> None:
    form, _ = build_request(client_config(), CredentialSpec(client="orders"))
    assert form == {"grant_type": "client_credentials"}


def test_route_token_params_extend_and_override_the_clients() -> None:
    form, _ = build_request(
        client_config(token_params=(("tenant", "client-level"), ("region", "eu"))),
        CredentialSpec(client="orders", token_params=(("tenant", "route-level"),)),
    )
    assert form == {"grant_type": "client_credentials", "tenant": "route-level", "region": "eu"}


# --- fetch against a local IdP --------------------------------------------------------

SUCCESS = json.dumps({"access_token": "tok-1", "token_type": "Bearer", "expires_in": 300})


@dataclass
class Answer:
    status: int = 200
    body: str = SUCCESS
    headers: dict[str, str] = field(default_factory=dict)
    hang: bool = False


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    form: dict[str, str]


class FakeIdp:
    """Answers with ``answers`` in turn (the last one repeats) and records requests."""

    def __init__(self) -> None:
        self.answers: list[Answer] = [Answer()]
        self.received: list[Received] = []
        self.redirect_hits = 0
        self.released = asyncio.Event()
        self.base = ""
        self.after_answer: Callable[[], None] | None = None

    @property
    def token_url(self) -> str:
        return f"{self.base}/token"

    async def token(self, request: web.Request) -> web.StreamResponse:
        raw = await request.text()
        self.received.append(
            Received(request.path, dict(request.headers), dict(parse_qsl(raw, strict_parsing=True)))
        )
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if answer.hang:
            await self.released.wait()
        if self.after_answer is not None:
            self.after_answer()
        return web.Response(
            status=answer.status,
            text=answer.body,
            headers={"Content-Type": "application/json", **answer.headers},
        )

    async def elsewhere(self, request: web.Request) -> web.StreamResponse:
        self.redirect_hits += 1
        return web.Response(text=SUCCESS, content_type="application/json")


@pytest.fixture
async def idp() -> AsyncIterator[FakeIdp]:
    fake = FakeIdp()
    app = web.Application()
    app.router.add_post("/token", fake.token)
    app.router.add_route("*", "/elsewhere", fake.elsewhere)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    fake.base = f"http://{host}:{port}"
    yield fake
    fake.released.set()
    await runner.cleanup()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def token_client(
    session: aiohttp.ClientSession,
    config: ClientConfig,
    *,
    timeout_s: float = 5.0,
    retries: int = 2,
) -> TokenClient:
    material = ClientMaterial({"orders": config})
    return TokenClient(session, material, timeout_s=timeout_s, retries=retries)


async def test_fetch_sends_the_basic_header_and_form_the_idp_receives(
    idp: FakeIdp, session: aiohttp.ClientSession
) -> None:
    config = client_config(token_url=idp.token_url, client_id="id:1", secret=TRICKY_SECRET)
    spec = CredentialSpec(client="orders", scope=("a", "b"), audience="https://api.example.com")
    grant = await token_client(session, config).fetch(spec)
    assert grant.access_token == "tok-1"
    assert grant.expires_in_s == 300.0
    (got,) = idp.received
    assert got.headers["Content-Type"] == "application/x-www-form-urlencoded"
    assert got.headers["Accept"] == "application/json"
    user, password = basic_pair(got.headers)
    assert (unquote_plus(user), unquote_plus(password)) == ("id:1", TRICKY_SECRET)
    assert got.form == {
        "grant_type": "client_credentials",
        "scope": "a b",
        "audience": "https://api.example.com",
    }


async def test_fetch_with_client_secret_post_sends_credentials_only_in_the_form(
    idp: FakeIdp, session: aiohttp.ClientSession
) -> None:
    config = client_config(
        token_url=idp.token_url, method=AuthMethod.CLIENT_SECRET_POST, secret=TRICKY_SECRET
    )
    await token_client(session, config).fetch(CredentialSpec(client="orders"))
    (got,) = idp.received
    assert "Authorization" not in got.headers
    assert got.form == {
        "grant_type": "client_credentials",
        "client_id": "orders-id",
        "client_secret": TRICKY_SECRET,
    }


async def test_server_errors_are_retried_until_success(
    idp: FakeIdp, session: aiohttp.ClientSession
) -> None:
    idp.answers = [Answer(500, "{}"), Answer(503, "oops"), Answer()]
    grant = await token_client(session, client_config(token_url=idp.token_url), retries=2).fetch(
        CredentialSpec(client="orders")
    )
    assert grant.access_token == "tok-1"
    assert len(idp.received) == 3


async def test_server_errors_past_the_retries_make_the_token_unavailable(
    idp: FakeIdp, session: aiohttp.ClientSession
) -> None:
    idp.answers = [Answer(503, "down")]
    client = token_client(session, client_config(token_url=idp.token_url), retries=1)
    with pytest.raises(TokenUnavailableError) as info:
        await client.fetch(CredentialSpec(client="orders"))
    assert len(idp.received) == 2
    assert info.value.detail == "the token endpoint of client 'orders' failed: HTTP 503"
    assert info.value.retry_after_s is not None
    assert info.value.retry_after_s >= 1.0


async def test_invalid_client_is_rejected_at_once_without_retry(
    idp: FakeIdp, session: aiohttp.ClientSession
) -> None:
    idp.answers = [
        Answer(400, json.dumps({"error": "invalid_client", "error_description": "s3cret bad"}))
    ]
    client = token_client(session, client_config(token_url=idp.token_url), retries=3)
    with pytest.raises(TokenRejectedError) as info:
        await client.fetch(CredentialSpec(client="orders"))
    assert info.value.oauth_error == "invalid_client"
    assert "s3cret bad" not in str(info.value)
    assert len(idp.received) == 1


async def test_unauthorized_answer_is_not_retried_either(
    idp: FakeIdp, session: aiohttp.ClientSession
) -> None:
    idp.answers = [Answer(401, json.dumps({"error": "invalid_client"}))]
    client = token_client(session, client_config(token_url=idp.token_url), retries=3)
    with pytest.raises(TokenRejectedError):
        await client.fetch(CredentialSpec(client="orders"))
    assert len(idp.received) == 1


async def test_too_many_requests_waits_the_retry_after_it_was_given(
    idp: FakeIdp, session: aiohttp.ClientSession
) -> None:
    idp.answers = [Answer(429, "{}", {"Retry-After": "1"}), Answer()]
    client = token_client(session, client_config(token_url=idp.token_url), retries=1)
    started = time.monotonic()
    grant = await client.fetch(CredentialSpec(client="orders"))
    elapsed = time.monotonic() - started
    assert grant.access_token == "tok-1"
    assert len(idp.received) == 2
    assert 1.0 <= elapsed < 3.0


async def test_retry_after_beyond_the_budget_fails_at_once_and_passes_it_on(
    idp: FakeIdp, session: aiohttp.ClientSession
) -> None:
    idp.answers = [Answer(429, "{}", {"Retry-After": "20"})]
    client = token_client(session, client_config(token_url=idp.token_url), timeout_s=2.0)
    started = time.monotonic()
    with pytest.raises(TokenUnavailableError) as info:
        await client.fetch(CredentialSpec(client="orders"))
    assert time.monotonic() - started < 1.0
    assert len(idp.received) == 1
    assert info.value.retry_after_s == 20.0


async def test_redirect_is_never_followed(idp: FakeIdp, session: aiohttp.ClientSession) -> None:
    idp.answers = [Answer(307, "", {"Location": f"{idp.base}/elsewhere"})]
    client = token_client(session, client_config(token_url=idp.token_url), retries=0)
    with pytest.raises(TokenError) as info:
        await client.fetch(CredentialSpec(client="orders"))
    assert idp.redirect_hits == 0
    assert "redirect" in info.value.detail


async def test_garbage_success_body_is_an_invalid_response_without_retry(
    idp: FakeIdp, session: aiohttp.ClientSession
) -> None:
    idp.answers = [Answer(200, "<html>maintenance</html>")]
    client = token_client(session, client_config(token_url=idp.token_url), retries=2)
    with pytest.raises(TokenResponseInvalidError):
        await client.fetch(CredentialSpec(client="orders"))
    assert len(idp.received) == 1


async def test_oversized_answer_is_not_accepted(
    idp: FakeIdp, session: aiohttp.ClientSession
) -> None:
    idp.answers = [Answer(200, json.dumps({"pad": "x" * 70_000}))]
    client = token_client(session, client_config(token_url=idp.token_url), retries=0)
    with pytest.raises(TokenResponseInvalidError) as info:
        await client.fetch(CredentialSpec(client="orders"))
    assert info.value.detail == "the token response is over 65536 bytes"
    assert len(idp.received) == 1  # not retried: the same answer would come back


async def test_hanging_endpoint_times_out_within_the_budget(
    idp: FakeIdp, session: aiohttp.ClientSession
) -> None:
    idp.answers = [Answer(hang=True)]
    client = token_client(session, client_config(token_url=idp.token_url), timeout_s=0.3)
    started = time.monotonic()
    with pytest.raises(TokenTimeoutError) as info:
        await client.fetch(CredentialSpec(client="orders"))
    assert 0.3 <= time.monotonic() - started < 1.0
    assert info.value.status == 504
    assert info.value.detail == ("the token endpoint of client 'orders' did not answer within 0.3s")


async def test_slow_retries_stop_at_the_budget_with_a_timeout(
    idp: FakeIdp, session: aiohttp.ClientSession
) -> None:
    idp.answers = [Answer(500, "{}"), Answer(hang=True)]
    client = token_client(session, client_config(token_url=idp.token_url), timeout_s=0.8)
    started = time.monotonic()
    with pytest.raises(TokenTimeoutError):
        await client.fetch(CredentialSpec(client="orders"))
    assert time.monotonic() - started < 1.5
    assert len(idp.received) == 2


async def test_unreachable_endpoint_is_unavailable(session: aiohttp.ClientSession) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = client_config(token_url=f"http://127.0.0.1:{port}/token")
    with pytest.raises(TokenUnavailableError) as info:
        await token_client(session, config, retries=0).fetch(CredentialSpec(client="orders"))
    assert info.value.detail.startswith(
        "the token endpoint of client 'orders' failed: network error"
    )


@pytest.mark.parametrize(
    "retry_after",
    ["soon", "Wed, 21 Oct 2015 07:28:00 GMT", "-1", "²"],
    ids=["text", "http-date", "negative", "non-ascii-digit"],
)
async def test_a_malformed_retry_after_is_ignored(
    idp: FakeIdp, session: aiohttp.ClientSession, retry_after: str
) -> None:
    idp.answers = [Answer(503, "{}", {"Retry-After": retry_after})]
    client = token_client(session, client_config(token_url=idp.token_url), retries=0)
    with pytest.raises(TokenUnavailableError) as info:
        await client.fetch(CredentialSpec(client="orders"))
    assert info.value.detail == "the token endpoint of client 'orders' failed: HTTP 503"


async def test_rotation_tries_the_next_secret_on_invalid_client_and_remembers_it(
    idp: FakeIdp, session: aiohttp.ClientSession
) -> None:
    rejected = Answer(401, json.dumps({"error": "invalid_client"}))
    idp.answers = [rejected, Answer(), Answer()]
    config = replace(
        client_config(token_url=idp.token_url, method=AuthMethod.CLIENT_SECRET_POST, secret="old"),
        fallback_secrets=(Secret("new"),),
    )
    client = token_client(session, config, retries=0)
    await client.fetch(CredentialSpec(client="orders"))
    await client.fetch(CredentialSpec(client="orders"))
    assert [r.form["client_secret"] for r in idp.received] == ["old", "new", "new"]


async def test_rotation_gives_up_after_every_secret_was_refused(
    idp: FakeIdp, session: aiohttp.ClientSession
) -> None:
    idp.answers = [Answer(401, json.dumps({"error": "invalid_client"}))]
    config = replace(
        client_config(token_url=idp.token_url, method=AuthMethod.CLIENT_SECRET_POST, secret="a"),
        fallback_secrets=(Secret("b"),),
    )
    with pytest.raises(TokenRejectedError) as info:
        await token_client(session, config, retries=0).fetch(CredentialSpec(client="orders"))
    assert info.value.oauth_error == "invalid_client"
    assert [r.form["client_secret"] for r in idp.received] == ["a", "b"]


async def test_rotation_does_not_try_other_secrets_for_other_rejections(
    idp: FakeIdp, session: aiohttp.ClientSession
) -> None:
    idp.answers = [Answer(400, json.dumps({"error": "invalid_scope"}))]
    config = replace(
        client_config(token_url=idp.token_url, method=AuthMethod.CLIENT_SECRET_POST, secret="a"),
        fallback_secrets=(Secret("b"),),
    )
    with pytest.raises(TokenRejectedError):
        await token_client(session, config, retries=0).fetch(CredentialSpec(client="orders"))
    assert len(idp.received) == 1


# --- credentials from files that change ------------------------------------------------


def file_client(token_url: str, secret_file: Path) -> ClientConfig:
    return replace(
        client_config(
            token_url=token_url,
            method=AuthMethod.CLIENT_SECRET_POST,
            secret=secret_file.read_text(),
        ),
        secret_files=(str(secret_file),),
    )


async def test_a_changed_secret_file_is_used_by_the_next_fetch(
    idp: FakeIdp, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text("old")
    client = token_client(session, file_client(idp.token_url, secret_file), retries=0)
    first = await client.fetch(CredentialSpec(client="orders"))
    secret_file.write_text("new-and-longer")
    second = await client.fetch(CredentialSpec(client="orders"))
    assert [r.form["client_secret"] for r in idp.received] == ["old", "new-and-longer"]
    assert first.fingerprint != second.fingerprint


async def test_invalid_client_rereads_the_file_once_and_retries(
    idp: FakeIdp, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """The IdP switched to the new secret a moment before the file changed on disk."""
    secret_file = tmp_path / "secret"
    secret_file.write_text("old")
    rejected = Answer(401, json.dumps({"error": "invalid_client"}))
    idp.answers = [rejected, Answer()]

    def rotate() -> None:  # the new file lands after the proxy read the old one
        secret_file.write_text("rotated")

    idp.after_answer = rotate
    client = token_client(session, file_client(idp.token_url, secret_file), retries=0)
    grant = await client.fetch(CredentialSpec(client="orders"))
    assert grant.access_token == "tok-1"
    assert [r.form["client_secret"] for r in idp.received] == ["old", "rotated"]


async def test_invalid_client_with_unchanged_files_is_not_retried(
    idp: FakeIdp, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text("old")
    idp.answers = [Answer(401, json.dumps({"error": "invalid_client"}))]
    client = token_client(session, file_client(idp.token_url, secret_file), retries=0)
    with pytest.raises(TokenRejectedError):
        await client.fetch(CredentialSpec(client="orders"))
    assert len(idp.received) == 1


def test_tls_client_auth_sends_only_the_client_id() -> None:
    config = replace(client_config(), client_secret=None, auth_method=AuthMethod.TLS_CLIENT_AUTH)
    form, headers = build_request(config, CredentialSpec(client="orders", scope=("read",)))
    assert form == {"grant_type": "client_credentials", "client_id": "orders-id", "scope": "read"}
    assert "Authorization" not in headers
