"""Where a connection's credentials live, resolved when a run needs them, never before.

A connection stores a *reference*, so a deployment that is already running picks up a connection
added after it started:

- ``env``: an environment variable of the process that runs the sync (set before the services
  start: a running process never sees a variable exported later);
- ``file``: a file read at every run (rotated in place, e.g. by a secrets agent);
- ``secret``: a key in the deployment's secrets directory, ``SYNC_SECRETS_DIR`` (default
  ``/run/secrets``, where Docker mounts secrets; Kubernetes mounts a Secret's keys as files of the
  directory the pod spec names), read at every run;
- ``stored``: the secret itself in the connections table, sealed with Fernet (AES-128-CBC with
  HMAC-SHA256, from ``cryptography``) under ``SYNC_CREDENTIALS_KEY``, which every process that
  runs syncs has in its environment. Several comma-separated keys rotate: the first seals, any
  opens.

Error messages name the reference (variable, path, key), never the secret.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from sync_project.core.errors import StoreError

if TYPE_CHECKING:
    from cryptography.fernet import MultiFernet

CredentialsKind = Literal["env", "file", "secret", "stored"]
KEY_ENV = "SYNC_CREDENTIALS_KEY"
SECRETS_DIR_ENV = "SYNC_SECRETS_DIR"
DEFAULT_SECRETS_DIR = "/run/secrets"
#: A credentials file bigger than this is not a token: refuse it rather than send it as a header.
MAX_SECRET_BYTES = 64 * 1024


class CredentialsError(StoreError):
    """A reference that cannot be resolved, or a secret that cannot be sealed or opened."""


def secrets_dir() -> Path:
    return Path(os.environ.get(SECRETS_DIR_ENV) or DEFAULT_SECRETS_DIR)


def check_secret_key(key: str) -> str:
    """A key names one file of the secrets directory, nothing outside it."""
    if not key or key in (".", "..") or "/" in key or "\\" in key or "\0" in key or key.startswith(".."):
        raise ValueError(f"secret key {key!r} must name one file of the secrets directory (no '/', not '..')")
    return key


def check_file_path(path: str) -> str:
    # Resolved by other processes (the daemon's runs, other hosts): a relative path would mean
    # whatever their working directory is.
    if not os.path.isabs(path):
        raise ValueError(f"credentials file {path!r} must be an absolute path (runs resolve it in their own directory)")
    return path


def read_secret_file(path: Path, what: str) -> str:
    try:
        with path.open("rb") as handle:
            raw = handle.read(MAX_SECRET_BYTES + 1)
    except FileNotFoundError:
        raise CredentialsError(f"{what}: {path} does not exist") from None
    except OSError as error:
        raise CredentialsError(f"{what}: {path} cannot be read ({error.strerror or type(error).__name__})") from None
    if len(raw) > MAX_SECRET_BYTES:
        raise CredentialsError(f"{what}: {path} is over {MAX_SECRET_BYTES} bytes, not a credential")
    try:
        # Mounted secrets and `echo > file` end in a newline that is not part of the token.
        value = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise CredentialsError(f"{what}: {path} is not UTF-8 text") from None
    if not value:
        raise CredentialsError(f"{what}: {path} is empty")
    return value


def _fernet(what: str) -> MultiFernet:
    # Imported here: only the runs that seal or unseal need cryptography.
    from cryptography.fernet import Fernet, MultiFernet

    keys = [key.strip() for key in (os.environ.get(KEY_ENV) or "").split(",") if key.strip()]
    if not keys:
        raise CredentialsError(f"{what}: {KEY_ENV} is not set; stored credentials are sealed with it")
    try:
        return MultiFernet([Fernet(key) for key in keys])
    except (ValueError, TypeError):
        raise CredentialsError(f"{what}: {KEY_ENV} is not a Fernet key (32 url-safe base64-encoded bytes)") from None


def seal(secret: str, what: str) -> str:
    """The secret encrypted under the first key of ``SYNC_CREDENTIALS_KEY``."""
    if not secret:
        raise ValueError(f"{what}: empty credentials")
    return _fernet(what).encrypt(secret.encode("utf-8")).decode("ascii")


def unseal(token: str, what: str) -> str:
    from cryptography.fernet import InvalidToken

    try:
        return _fernet(what).decrypt(token.encode("ascii")).decode("utf-8")
    except InvalidToken:
        raise CredentialsError(
            f"{what}: the stored credentials do not open with {KEY_ENV} (another key sealed them?)"
        ) from None


def generate_key() -> str:
    from cryptography.fernet import Fernet

    return Fernet.generate_key().decode("ascii")
