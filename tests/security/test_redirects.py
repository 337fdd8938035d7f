"""Redirects from the upstream are handed to the client as they are, never followed: a
token never reaches a redirect target (another route's host, the cloud metadata address)."""

from __future__ import annotations

import pytest

from tests.security.capture import Answer, CapturedRequest
from tests.security.rig import API, OTHER, Rig

LOCATIONS = [
    "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
    f"http://{OTHER}/steal",
    "http://127.0.0.1:1/",
    f"https://{API}/upgraded",
    "//evil.test/scheme-relative",
]


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
@pytest.mark.parametrize("location", LOCATIONS)
async def test_redirect_is_passed_to_the_client_and_not_followed(
    rig: Rig, status: int, location: str
) -> None:
    def redirect(_request: CapturedRequest) -> Answer:
        return Answer(status, (("Location", location),), b"moved")

    rig.a.responder = redirect
    data = (
        f"POST http://{API}/p HTTP/1.1\r\nHost: {API}\r\nContent-Length: 5\r\n\r\nhello"
    ).encode()
    reply = await rig.send(data)
    assert reply.error is None
    assert reply.statuses == [status]
    [response] = reply.responses
    assert response.header("Location") == [location.encode()]
    assert response.body == b"moved"
    assert len(rig.a.requests) == 1, "the proxy followed the redirect"
    assert rig.b.requests == []
    assert rig.b.connections == []
    rig.assert_upstream_clean()
    await rig.assert_still_serves()
