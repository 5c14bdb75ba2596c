"""A connection: one customer's account at a provider, as providers and syncs see it.

The store keeps connections in a table (``sync_project.store``); this is the value it returns and
every provider client is built from, so sync authors never import the store to name it. Its
credentials are a reference that :meth:`ProviderConnection.credentials` resolves when a run
needs them (see :mod:`sync_project.core.credentials`).
"""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, SecretStr, model_validator

from sync_project.core import credentials as secrets

ConnectionStatus = Literal["active", "paused"]


class ProviderConnection(BaseModel):
    provider: str
    connection_id: str
    account_id: str | None = None
    #: Where the credentials are (at most one; see :mod:`sync_project.core.credentials`): the
    #: name of an environment variable, a file's path, a key of the secrets directory.
    credentials_env: str | None = None
    credentials_file: str | None = None
    credentials_secret: str | None = None
    #: Or the secret itself, sealed with SYNC_CREDENTIALS_KEY: never dumped, never in a repr.
    credentials_sealed: SecretStr | None = Field(default=None, exclude=True, repr=False)
    config: dict[str, Any] = Field(default_factory=dict)
    status: ConnectionStatus = "active"
    #: This connection's own poll interval in seconds (None: its sync's).
    poll_interval_s: int | None = None
    #: This connection's own full-refresh cadence in seconds (None: its sync's; 0: never by cadence).
    full_refresh_interval_s: int | None = None
    created_at: datetime
    updated_at: datetime

    @model_validator(mode="after")
    def _one_reference(self) -> ProviderConnection:
        kinds = [kind for kind, value in self._references() if value]
        if len(kinds) > 1:
            raise ValueError(f"one credentials reference at most, got {' and '.join(kinds)}")
        return self

    def _references(self) -> list[tuple[secrets.CredentialsKind, object]]:
        return [
            ("env", self.credentials_env),
            ("file", self.credentials_file),
            ("secret", self.credentials_secret),
            ("stored", self.credentials_sealed),
        ]

    @property
    def credentials_kind(self) -> secrets.CredentialsKind | None:
        return next((kind for kind, value in self._references() if value), None)

    @property
    def credentials_ref(self) -> str:
        """The reference as shown to people (``$VAR``, ``file:PATH``, ``secret:KEY``, ``stored``):
        where the secret is, never the secret."""
        kind = self.credentials_kind
        if kind == "env":
            return f"${self.credentials_env}"
        if kind == "file":
            return f"file:{self.credentials_file}"
        if kind == "secret":
            return f"secret:{self.credentials_secret}"
        return "stored (encrypted)" if kind == "stored" else "-"

    def credentials(self) -> str | None:
        """The secret, resolved now (by the run that needs it), from wherever the reference says."""
        what = f"connection {self.provider}/{self.connection_id}"
        kind = self.credentials_kind
        if kind is None:
            return None
        if kind == "env":
            assert self.credentials_env is not None
            value = os.environ.get(self.credentials_env)
            if not value:
                raise secrets.CredentialsError(
                    f"{what}: environment variable {self.credentials_env} is not set (in the process that runs "
                    "the sync; a running service never sees a variable exported after it started: use "
                    "--credentials-file, --credentials-secret or --store-credentials for that)"
                )
            return value
        if kind == "file":
            return secrets.read_secret_file(Path(str(self.credentials_file)), f"{what}: credentials file")
        if kind == "secret":
            directory = secrets.secrets_dir()
            return secrets.read_secret_file(
                directory / str(self.credentials_secret),
                f"{what}: secret {self.credentials_secret!r} of {secrets.SECRETS_DIR_ENV}={directory}",
            )
        assert self.credentials_sealed is not None
        return secrets.unseal(self.credentials_sealed.get_secret_value(), what)

    def dump(self) -> dict[str, Any]:
        """What ``connections list --json`` shows: every field, the reference described, no secret."""
        return {**self.model_dump(mode="json"), "credentials": self.credentials_ref}
