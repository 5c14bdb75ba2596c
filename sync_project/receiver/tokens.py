"""Records API tokens and what each may read.

Three sources, read once when the app is created:

- ``SYNC_RECORDS_API_TOKEN``: tokens that read everything (comma- or space-separated, to rotate).
- ``SYNC_RECORDS_API_TOKENS``: scoped tokens, ``TOKEN=SCOPE[,SCOPE...]`` entries separated by ``;``
  or whitespace, e.g. ``tok_crm=github,sandbox/acme; tok_ops=*``.
- ``SYNC_RECORDS_API_TOKENS_FILE``: a JSON file of scoped tokens stored as SHA-256 hashes, so the
  file holds no usable secret::

      {"tokens": [{"name": "crm-app", "sha256": "<hex of sha256(token)>", "scopes": ["github"]}]}

  (``printf %s "$TOKEN" | sha256sum`` gives the hash.) ``name`` is what the log calls the token.

A scope is ``*`` (everything), ``PROVIDER`` (every connection of that provider, in all its syncs)
or ``PROVIDER/CONNECTION``: what the token may *read* (the records API). Prefixed ``control:``
(``control:*``, ``control:PROVIDER``, ``control:PROVIDER/CONNECTION``) it is what the token may
*control* (the control API: trigger, pause, resume, status). Neither implies the other: a token
that reads everything controls nothing, so an application reading records cannot start runs.
Tokens are kept only as SHA-256 digests, compared in constant time against every configured one.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

TOKEN_ENV = "SYNC_RECORDS_API_TOKEN"
SCOPED_TOKENS_ENV = "SYNC_RECORDS_API_TOKENS"
TOKENS_FILE_ENV = "SYNC_RECORDS_API_TOKENS_FILE"
EVERYTHING = "*"
#: The prefix of a control scope.
CONTROL = "control:"
_HEX_DIGEST = re.compile(r"[0-9a-f]{64}")


class TokenConfigError(ValueError):
    """The configured tokens cannot be read: the receiver refuses to start, saying where."""


@dataclass(frozen=True)
class ApiToken:
    name: str
    digest: bytes
    scopes: frozenset[str]

    def allows(self, provider: str, connection_id: str, *, control: bool = False) -> bool:
        """Whether the token may read (or, with ``control``, control) this connection."""
        prefix = CONTROL if control else ""
        return bool(
            {f"{prefix}{scope}" for scope in (EVERYTHING, provider, f"{provider}/{connection_id}")} & self.scopes
        )

    @property
    def controls_anything(self) -> bool:
        return any(scope.startswith(CONTROL) for scope in self.scopes)


def digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()


def load_tokens(environ: Mapping[str, str] | None = None) -> list[ApiToken]:
    """Every configured token from the three sources (see the module docstring)."""
    env = os.environ if environ is None else environ
    tokens = [
        ApiToken(f"{TOKEN_ENV}#{n}", digest(token), frozenset({EVERYTHING}))
        for n, token in enumerate(t for t in re.split(r"[,\s]+", env.get(TOKEN_ENV, "")) if t)
    ]
    for n, entry in enumerate(e for e in re.split(r"[;\s]+", env.get(SCOPED_TOKENS_ENV, "")) if e):
        token, sep, scopes = entry.rpartition("=")
        if not sep or not token:
            raise TokenConfigError(f"{SCOPED_TOKENS_ENV} entry #{n} is not TOKEN=SCOPE[,SCOPE...]")
        label = f"{SCOPED_TOKENS_ENV} entry #{n}"
        tokens.append(ApiToken(f"{SCOPED_TOKENS_ENV}#{n}", digest(token), _scopes(scopes.split(","), label)))
    path = env.get(TOKENS_FILE_ENV)
    if path:
        tokens.extend(_from_file(Path(path)))
    return tokens


def tokens_from(plain: Sequence[str]) -> list[ApiToken]:
    """Tokens that read everything, given directly (tests, embedding)."""
    return [ApiToken(f"token#{n}", digest(token), frozenset({EVERYTHING})) for n, token in enumerate(plain)]


def bearer(authorization: str, tokens: Sequence[ApiToken]) -> ApiToken | None:
    """The token of an ``Authorization: Bearer <token>`` header (the records and control APIs
    alike), or None for no header, another scheme, or a token that is not configured."""
    scheme, _, given = authorization.partition(" ")
    return authenticate(given.strip(), tokens) if scheme.lower() == "bearer" and given.strip() else None


def authenticate(given: str, tokens: Sequence[ApiToken]) -> ApiToken | None:
    """The token ``given`` is, comparing its digest with every configured one in constant time."""
    offered = digest(given)
    found = None
    for token in tokens:
        if hmac.compare_digest(offered, token.digest):
            found = token
    return found


def _from_file(path: Path) -> list[ApiToken]:
    where = f"{TOKENS_FILE_ENV} ({path})"
    try:
        document = json.loads(path.read_text())
    except OSError as error:
        raise TokenConfigError(f"{where}: cannot read it: {error.strerror}") from None
    except ValueError as error:
        raise TokenConfigError(f"{where}: not JSON: {error}") from None
    entries = document.get("tokens") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        raise TokenConfigError(f'{where}: expected {{"tokens": [{{"name", "sha256", "scopes"}}, ...]}}')
    tokens = []
    for n, entry in enumerate(entries):
        label = f"{where} token #{n}"
        if not isinstance(entry, dict):
            raise TokenConfigError(f"{label} is not an object")
        hashed, scopes = entry.get("sha256"), entry.get("scopes")
        if not isinstance(hashed, str) or not _HEX_DIGEST.fullmatch(hashed.lower()):
            raise TokenConfigError(f"{label}: sha256 must be 64 hex digits (the token's SHA-256, not the token)")
        if not isinstance(scopes, list) or not all(isinstance(s, str) for s in scopes):
            raise TokenConfigError(f"{label}: scopes must be a list of strings")
        name = entry.get("name") if isinstance(entry.get("name"), str) else f"{TOKENS_FILE_ENV}#{n}"
        tokens.append(ApiToken(str(name), bytes.fromhex(hashed), _scopes(scopes, label)))
    return tokens


def _scopes(values: Sequence[str], where: str) -> frozenset[str]:
    scopes = frozenset(value.strip() for value in values if value.strip())
    if not scopes:
        raise TokenConfigError(f"{where}: no scope (use * for everything)")
    for scope in scopes:
        bare = scope.removeprefix(CONTROL)
        provider, slash, connection = bare.partition("/")
        if bare == EVERYTHING:
            continue
        if not provider or EVERYTHING in bare or ":" in provider or (slash and (not connection or "/" in connection)):
            raise TokenConfigError(
                f"{where}: scope {scope!r} is not *, PROVIDER or PROVIDER/CONNECTION (each may be prefixed control:)"
            )
    return scopes
