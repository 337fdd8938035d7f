"""Checks of the ``clients`` section: token URL or issuer, secrets, keys, assertions."""

from __future__ import annotations

from pathlib import Path as FsPath
from typing import Any
from urllib.parse import urlsplit

from m2m_proxy.authority import (
    secure_or_loopback,
)
from m2m_proxy.config.model import (
    AuthMethod,
    ClientCertificate,
    ClientConfig,
    Secret,
    SigningKey,
)
from m2m_proxy.config.report import Reporter
from m2m_proxy.config.schema import ClientSection
from m2m_proxy.config.source import Path
from m2m_proxy.keys import SigningKeyError, check_alg
from m2m_proxy.tls import TlsMaterialError, client_context

_SECRET_FIELDS = ("client_secret", "client_secret_file")
_JWT_FIELDS = ("private_key_file", "key_id", "signing_alg", "client_assertion_file")


class ClientChecks(Reporter):
    """Turns a validated client section into a :class:`ClientConfig`, or records why not."""

    def _client(self, name: str, section: ClientSection) -> ClientConfig | None:
        base: Path = ("clients", name)
        self._endpoint(base, section)
        method = AuthMethod(section.auth_method)
        params = self._token_params((*base, "token_params"), section.token_params)
        certificate = self._certificate(base, section, method)
        ca_file = self._ca_file((*base, "ca_file"), section.ca_file)
        fallbacks: tuple[Secret, ...] = ()
        secret_files: tuple[str, ...] = ()
        secret, key, assertion_file = None, None, None
        if method.uses_certificate:
            self._unused(
                base,
                section,
                _SECRET_FIELDS + _JWT_FIELDS,
                f"is not used with {method.value}; remove it",
            )
            if certificate is None:
                return None
        elif method is AuthMethod.PRIVATE_KEY_JWT and section.client_assertion_file is not None:
            assertion_file = self._assertion_file(base, section)
            if assertion_file is None:
                return None
        elif method is AuthMethod.PRIVATE_KEY_JWT:
            key = self._signing_key(base, section)
            if key is None:
                return None
        else:
            self._unused(
                base,
                section,
                _JWT_FIELDS,
                f"is only used with auth_method: private_key_jwt, not {method.value}; remove it",
            )
            secrets = self._secrets(base, section)
            if secrets is None:
                return None
            secret, fallbacks = secrets[0], tuple(secrets[1:])
            secret_files = tuple(_as_list(section.client_secret_file))
        if section.client_cert_file is not None and certificate is None:
            return None
        if section.ca_file is not None and ca_file is None:
            return None
        return ClientConfig(
            name=name,
            token_url=section.token_url,
            client_id=section.client_id,
            client_secret=secret,
            fallback_secrets=fallbacks,
            auth_method=method,
            token_params=params,
            issuer=section.issuer,
            signing_key=key,
            assertion_file=assertion_file,
            prefetch=section.prefetch,
            assertion_typ=section.assertion_typ,
            secret_files=secret_files,
            certificate=certificate,
            ca_file=ca_file,
        )

    def _endpoint(self, base: Path, section: ClientSection) -> None:
        if (section.token_url is None) == (section.issuer is None):
            self.problem(
                base,
                "set exactly one of token_url or issuer (the token endpoint is then discovered)",
            )
        if section.token_url is not None:
            self._check_token_url((*base, "token_url"), section.token_url)
        if section.issuer is not None:
            self._check_token_url((*base, "issuer"), section.issuer)

    def _unused(
        self, base: Path, section: ClientSection, fields: tuple[str, ...], message: str
    ) -> None:
        for field in fields:
            if getattr(section, field) is not None:
                self.problem((*base, field), message, key=True)

    def _certificate(
        self, base: Path, section: ClientSection, method: AuthMethod
    ) -> ClientCertificate | None:
        """The TLS client certificate, checked loadable; required by the tls_* methods."""
        cert, key = section.client_cert_file, section.client_key_file
        if cert is None and key is None:
            if method.uses_certificate:
                self.problem(
                    base,
                    f"{method.value} needs client_cert_file and client_key_file: the PEM "
                    "certificate the IdP knows this client by, and its private key",
                )
            return None
        if cert is None or key is None:
            missing = "client_cert_file" if cert is None else "client_key_file"
            self.problem(base, f"set {missing} too: the certificate and its key go together")
            return None
        certificate = ClientCertificate(cert_file=cert, key_file=key)
        try:
            client_context(certificate=certificate)
        except TlsMaterialError as exc:
            self.problem((*base, "client_cert_file"), str(exc))
            return None
        return certificate

    def _assertion_file(self, base: Path, section: ClientSection) -> str | None:
        """An externally made assertion: checked readable now, read again per request."""
        self._unused(
            base,
            section,
            (*_SECRET_FIELDS, "private_key_file", "key_id", "signing_alg"),
            "is not used with client_assertion_file (the assertion is already signed); remove it",
        )
        path = (*base, "client_assertion_file")
        if self._read_secret_file(path, section.client_assertion_file) is None:
            return None
        return section.client_assertion_file

    def _signing_key(self, base: Path, section: ClientSection) -> SigningKey | None:
        self._unused(
            base,
            section,
            _SECRET_FIELDS,
            "private_key_jwt signs with private_key_file and sends no secret; remove it",
        )
        if section.private_key_file is None:
            self.problem(
                base,
                "private_key_jwt needs private_key_file: a PEM file with the "
                "client's RSA or EC P-256 private key",
            )
            return None
        path = (*base, "private_key_file")
        pem = self._read_secret_file(path, section.private_key_file)
        if pem is None:
            return None
        try:
            alg = check_alg(pem.value, section.signing_alg)
        except SigningKeyError as exc:
            self.problem(path, f"{exc}; give an unencrypted PEM private key (RSA or EC P-256)")
            return None
        return SigningKey(pem=pem, alg=alg, key_id=section.key_id, file=section.private_key_file)

    def _check_raw_client(self, name: str, item: Any) -> None:
        """Checks that do not need a valid section, so one bad field hides nothing."""
        if not isinstance(item, dict):
            return
        base: Path = ("clients", name)
        for field in ("token_url", "issuer"):
            if isinstance(item.get(field), str):
                self._check_token_url((*base, field), item[field])
        if isinstance(item.get("client_secret_file"), str):
            self._read_secret_file((*base, "client_secret_file"), item["client_secret_file"])
        if isinstance(item.get("token_params"), dict):
            self._token_params((*base, "token_params"), item["token_params"])

    def _check_token_url(self, path: Path, url: str) -> None:
        try:
            parts = urlsplit(url)
            _ = parts.port  # raises ValueError for a port out of range or not a number
        except ValueError as exc:
            self.problem(
                path,
                f"'{url}' is not a valid URL ({exc}); write e.g. "
                "https://idp.example.com/oauth2/token",
            )
            return
        if parts.scheme not in ("http", "https") or not parts.hostname:
            self.problem(
                path,
                f"'{url}' is not an http(s) URL; write e.g. https://idp.example.com/oauth2/token",
            )
            return
        if parts.username or parts.password or parts.fragment:
            self.problem(path, "must not carry user:password@ or a #fragment; remove them")
        if not secure_or_loopback(parts.scheme, parts.hostname):
            self.problem(
                path,
                "must be https (client secrets would travel in cleartext); "
                "plain http is only allowed on loopback",
            )

    def _secrets(self, base: Path, section: ClientSection) -> list[Secret] | None:
        """The client's secrets in order; more than one during a rotation."""
        if (section.client_secret is None) == (section.client_secret_file is None):
            self.problem(base, "set exactly one of client_secret or client_secret_file")
            return None
        if section.client_secret is not None:
            values = _as_list(section.client_secret)
            for i, value in enumerate(values):
                if not value:
                    path = (
                        (*base, "client_secret", i) if len(values) > 1 else (*base, "client_secret")
                    )
                    self.problem(path, "is empty; set it (e.g. from ${ENV})")
                    return None
            if not values:
                return self._no_secret(base, "client_secret")
            return [Secret(v) for v in values]
        files = _as_list(section.client_secret_file)
        secrets = [
            self._read_secret_file(
                (*base, "client_secret_file", i)
                if len(files) > 1
                else (*base, "client_secret_file"),
                file,
            )
            for i, file in enumerate(files)
        ]
        if not files:
            return self._no_secret(base, "client_secret_file")
        if any(s is None for s in secrets):
            return None
        return [s for s in secrets if s is not None]

    def _no_secret(self, base: Path, field: str) -> list[Secret] | None:
        self.problem((*base, field), "is an empty list; give one secret, or two during a rotation")
        return None

    def _read_secret_file(self, path: Path, file: str | None) -> Secret | None:
        try:
            value = FsPath(str(file)).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not UTF-8"
            self.problem(
                path,
                f"cannot read '{file}': {reason}; check the path and that this user may read it",
            )
            return None
        if not value:
            self.problem(path, f"'{file}' is empty; put the secret in it")
            return None
        return Secret(value)


def _as_list(value: str | list[str] | None) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)
