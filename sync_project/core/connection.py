"""A connection: one customer's account at a provider, as providers and syncs see it.

The store keeps connections in a table (``sync_project.store``); this is the value it returns and
every provider client is built from, so sync authors never import the store to name it.
"""

from __future__ import annotations

import os
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from sync_project.core.errors import StoreError

ConnectionStatus = Literal["active", "paused"]


class ProviderConnection(BaseModel):
    provider: str
    connection_id: str
    account_id: str | None = None
    #: Name of the environment variable that holds this connection's credentials (never the value).
    credentials_env: str | None = None
    config: dict[str, Any] = Field(default_factory=dict)
    status: ConnectionStatus = "active"
    created_at: datetime
    updated_at: datetime

    def credentials(self) -> str | None:
        """The secret, read from the environment when it is needed and never stored."""
        if not self.credentials_env:
            return None
        value = os.environ.get(self.credentials_env)
        if not value:
            raise StoreError(
                f"connection {self.provider}/{self.connection_id}: environment variable "
                f"{self.credentials_env} is not set"
            )
        return value
