"""Reporter: the base of the routes-file checks, recording problems with their marks.

Shared by the client and route checks: ``problem`` (one per field, with the file
position) and the ``token_params`` and ``ca_file`` rules that clients and routes have
in common.
"""

from __future__ import annotations

import difflib
import ipaddress
from collections.abc import Collection

from m2m_proxy.config.model import AccessPolicy, Network
from m2m_proxy.config.source import Path, Problem, SourceDocument, format_path
from m2m_proxy.tls import TlsMaterialError, client_context

# Form parameters the proxy sets itself; token_params may not override them.
RESERVED_TOKEN_PARAMS = frozenset(
    {
        "grant_type",
        "client_id",
        "client_secret",
        "scope",
        "audience",
        "resource",
        "client_assertion",
        "client_assertion_type",
    }
)


class Reporter:
    """Collects :class:`Problem` values for one file; the checks build on it."""

    def __init__(self, file: str, doc: SourceDocument) -> None:
        self._file = file
        self._doc = doc
        self.problems: list[Problem] = []

    def problem(self, path: Path, message: str, *, key: bool = False) -> None:
        shown = format_path(path)
        if any(p.path == shown for p in (*self._doc.problems, *self.problems)):
            return  # one problem per field: the first is the cause, later ones its echo
        mark = self._doc.mark_for(path, key=key)
        self.problems.append(Problem(self._file, mark, shown, message))

    def _token_params(self, path: Path, params: dict[str, str]) -> tuple[tuple[str, str], ...]:
        for name in params:
            if name in RESERVED_TOKEN_PARAMS:
                self.problem(
                    (*path, name),
                    "is set by the proxy itself; use the route's or "
                    "client's dedicated field instead",
                    key=True,
                )
        return tuple(sorted(params.items()))

    def _ca_file(self, path: Path, file: str | None) -> str | None:
        if file is None:
            return None
        try:
            client_context(ca_file=file)
        except TlsMaterialError as exc:
            self.problem(path, str(exc))
            return None
        return file

    def _networks(self, path: Path, values: list[str]) -> tuple[Network, ...]:
        networks = []
        for i, value in enumerate(values):
            try:
                networks.append(ipaddress.ip_network(value.strip(), strict=False))
            except ValueError:
                self.problem(
                    (*path, i),
                    f"'{value}' is not an address or CIDR; write e.g. 10.0.0.0/8 or 192.0.2.7",
                )
        return tuple(networks)

    def _access_policy(
        self,
        base: Path,
        allow_from: list[str] | None,
        allow_users: list[str] | None,
        users: Collection[str],
    ) -> AccessPolicy:
        """The ``allow_from`` / ``allow_users`` pair of a route or of ``proxy``."""
        networks = None
        if allow_from is not None:
            networks = self._networks((*base, "allow_from"), allow_from)
        names = None
        if allow_users is not None:
            for i, name in enumerate(allow_users):
                if name not in users:
                    guess = difflib.get_close_matches(name, sorted(users), n=1)
                    hint = f"did you mean '{guess[0]}'?" if guess else "define it under proxy.users"
                    self.problem((*base, "allow_users", i), f"unknown user '{name}'; {hint}")
            names = frozenset(allow_users)
        return AccessPolicy(networks, names)
