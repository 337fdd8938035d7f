"""TLS client contexts: the system trust store, an optional extra CA bundle, an
optional client certificate (RFC 8705). Verification is always on.

Used for the token endpoint (a client's ``ca_file`` and ``client_cert_file``) and for
https upstreams (a route's ``ca_file``, and the client certificate when the route sets
``client_certificate: true``). Building a context reads the files, so it happens at
start and when :mod:`m2m_proxy.tokens.material` sees a file change, never per request.
"""

from __future__ import annotations

import ssl

from m2m_proxy.config.model import ClientCertificate


class TlsMaterialError(ValueError):
    """A CA bundle or certificate/key pair cannot be used; the message says why."""


def client_context(
    ca_file: str | None = None, certificate: ClientCertificate | None = None
) -> ssl.SSLContext:
    """A verifying client context; raises TlsMaterialError naming the bad file."""
    context = ssl.create_default_context()
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if ca_file is not None:
        try:
            context.load_verify_locations(cafile=ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise TlsMaterialError(
                f"cannot use '{ca_file}' as a CA bundle ({_reason(exc)}); "
                "give a PEM file with one or more CA certificates"
            ) from None
    if certificate is not None:
        try:
            # An encrypted key fails instead of prompting on the terminal.
            context.load_cert_chain(certificate.cert_file, certificate.key_file, password=b"")
        except (OSError, ssl.SSLError) as exc:
            raise TlsMaterialError(
                f"cannot use '{certificate.cert_file}' with key '{certificate.key_file}' "
                f"({_reason(exc)}); give a PEM certificate and its unencrypted PEM private key"
            ) from None
    return context


def _reason(exc: OSError | ssl.SSLError) -> str:
    if isinstance(exc, ssl.SSLError):
        return exc.reason or "not valid PEM"
    return exc.strerror or type(exc).__name__
