"""ClientMaterial: each client's current secrets, key and certificate, re-read from
disk when their files change, and a fingerprint of them.

Kubernetes updates a secret volume by swapping a symlink (``..data``); ``os.stat``
follows it, so a swap, like an in-place write, shows as a new (device, inode, size,
mtime) stamp. :meth:`ClientMaterial.refresh` compares stamps (a few ``stat`` calls, no
reads) and re-reads only changed files. A file that is missing, empty or unparsable
in the middle of a swap keeps the old material; the problem is reported and the next
check tries again.

The fingerprint is a keyed BLAKE2b hash of all of a client's material, with a key
drawn at random per process: it changes exactly when the material does and reveals
nothing about it. Tokens carry the fingerprint they were minted with, and the token
cache drops a client's tokens when it changes, so a rotated secret never serves a
token minted for the old one.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

from m2m_proxy.config import ClientConfig, RouteConfig, Secret
from m2m_proxy.files import Stamp, stamp
from m2m_proxy.keys import SigningKeyError, check_alg
from m2m_proxy.tls import client_context


@dataclass(frozen=True, slots=True)
class MaterialChange:
    """A client whose material changed (``fingerprint`` is the new one)."""

    client: str
    fingerprint: str


class ClientMaterial:
    """The live view of the clients' credentials; :meth:`client` is always current."""

    def __init__(
        self,
        clients: Mapping[str, ClientConfig],
        *,
        on_change: Callable[[MaterialChange], None] | None = None,
        on_problem: Callable[[str, str], None] | None = None,
    ) -> None:
        """``on_change(change)`` runs for each change; ``on_problem(client, detail)``
        once per new problem (not again while the same problem persists)."""
        self._on_change = on_change
        self._on_problem = on_problem
        self._problems: dict[str, str] = {}
        self._clients = dict(clients)
        self._key = secrets.token_bytes(32)
        self._stamps: dict[str, Stamp | None] = {
            path: stamp(path) for client in clients.values() for path in client.files
        }
        self._fingerprints = {name: self._fingerprint(c) for name, c in clients.items()}
        self._contexts: dict[str, ssl.SSLContext | None] = {}
        self._upstream_contexts: dict[tuple[str | None, str | None], ssl.SSLContext] = {}

    def client(self, name: str) -> ClientConfig:
        return self._clients[name]

    def fingerprint(self, name: str) -> str:
        return self._fingerprints[name]

    def idp_context(self, name: str) -> ssl.SSLContext | None:
        """The TLS context for the client's token endpoint, or None for the default.

        Built once per material: it trusts ``ca_file`` and presents the certificate.
        """
        if name not in self._contexts:
            client = self._clients[name]
            if client.ca_file is None and client.certificate is None:
                self._contexts[name] = None
            else:
                self._contexts[name] = client_context(client.ca_file, client.certificate)
        return self._contexts[name]

    def upstream_context(self, route: RouteConfig) -> ssl.SSLContext | None:
        """The TLS context for the route's https upstream, or None for the default:
        it trusts the route's ``ca_file`` and, with ``client_certificate: true``,
        presents the client's certificate (so certificate-bound tokens verify)."""
        if route.ca_file is None and not route.client_certificate:
            return None
        client = route.credential.client if route.client_certificate else None
        key = (client, route.ca_file)
        context = self._upstream_contexts.get(key)
        if context is None:
            certificate = self._clients[client].certificate if client is not None else None
            context = client_context(route.ca_file, certificate)
            self._upstream_contexts[key] = context
        return context

    def refresh(self) -> list[MaterialChange]:
        """Re-read changed files and report; returns the changes.

        A problem names the file, never the content.
        """
        changes: list[MaterialChange] = []
        for name, client in self._clients.items():
            changed = [p for p in client.files if stamp(p) != self._stamps.get(p)]
            if not changed:
                continue
            try:
                updated = _reread(client)
            except (OSError, ValueError) as exc:
                detail = f"{_describe(exc)}; keeping the previous credentials"
                if self._problems.get(name) != detail and self._on_problem is not None:
                    self._on_problem(name, detail)
                self._problems[name] = detail
                continue
            self._problems.pop(name, None)
            for path in changed:
                self._stamps[path] = stamp(path)
            fingerprint = self._fingerprint(updated)
            self._clients[name] = updated
            self._forget_contexts(name)
            if fingerprint != self._fingerprints[name]:
                self._fingerprints[name] = fingerprint
                change = MaterialChange(name, fingerprint)
                changes.append(change)
                if self._on_change is not None:
                    self._on_change(change)
        return changes

    def replace_clients(self, clients: Mapping[str, ClientConfig]) -> list[str]:
        """A reloaded config's clients; returns the names added, changed or removed
        (whose tokens must go). Unchanged clients keep their state."""
        changed = sorted(
            name
            for name in self._clients.keys() | clients.keys()
            if self._clients.get(name) != clients.get(name)
        )
        self._clients = dict(clients)
        for name in changed:
            self._forget_contexts(name)
            self._problems.pop(name, None)
            self._fingerprints.pop(name, None)
            if name in clients:
                self._fingerprints[name] = self._fingerprint(clients[name])
        self._stamps = {
            path: stamp(path) if name in changed else self._stamps.get(path)
            for name, client in clients.items()
            for path in client.files
        }
        return changed

    def _forget_contexts(self, name: str) -> None:
        """TLS contexts built from ``name``'s old material are rebuilt on next use."""
        self._contexts.pop(name, None)
        for key in [k for k in self._upstream_contexts if k[0] == name]:
            del self._upstream_contexts[key]

    @property
    def has_files(self) -> bool:
        return bool(self._stamps)

    async def watch(self, interval_s: float) -> None:
        """Check the files every ``interval_s`` until cancelled."""
        while True:
            await asyncio.sleep(interval_s)
            self.refresh()

    def _fingerprint(self, client: ClientConfig) -> str:
        digest = hashlib.blake2b(key=self._key, digest_size=8)
        for secret in (client.client_secret, *client.fallback_secrets):
            digest.update(b"s" + (secret.value.encode() if secret else b"") + b"\0")
        if client.signing_key is not None:
            digest.update(b"k" + client.signing_key.pem.value.encode() + b"\0")
        if client.certificate is not None:
            for path in (client.certificate.cert_file, client.certificate.key_file):
                digest.update(b"c" + _read_bytes(path) + b"\0")
        return digest.hexdigest()


def _reread(client: ClientConfig) -> ClientConfig:
    """``client`` with its file-backed material read again; raises when unusable."""
    if client.secret_files:
        values = [Secret(_read_text(path)) for path in client.secret_files]
        client = replace(client, client_secret=values[0], fallback_secrets=tuple(values[1:]))
    key = client.signing_key
    if key is not None and key.file is not None:
        pem = _read_text(key.file)
        try:
            alg = check_alg(pem, key.alg)
        except SigningKeyError as exc:
            raise ValueError(f"'{key.file}': {exc}") from None
        client = replace(client, signing_key=replace(key, pem=Secret(pem), alg=alg))
    if client.certificate is not None:
        client_context(certificate=client.certificate)  # raises TlsMaterialError when unusable
    return client


def _read_text(path: str) -> str:
    with open(path, encoding="utf-8") as file:  # small files, only when changed
        value = file.read().strip()
    if not value:
        raise ValueError(f"'{path}' is empty")
    return value


def _read_bytes(path: str) -> bytes:
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError:
        return b""


def _describe(exc: Exception) -> str:
    if isinstance(exc, OSError):
        return f"cannot read '{exc.filename}' ({exc.strerror or type(exc).__name__})"
    if isinstance(exc, UnicodeDecodeError):
        return "a file is not UTF-8"  # str(exc) would quote a byte of the secret
    return str(exc)  # TlsMaterialError, ValueError: they name the file, not the content
