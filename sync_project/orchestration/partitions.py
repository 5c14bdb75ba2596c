"""One dynamic partition per connection, one partitions definition per provider."""

from __future__ import annotations

from functools import cache
from typing import Any, Literal

import dagster as dg


def partitions_name(provider: str) -> str:
    return f"{provider}_connections"


@cache
def connection_partitions(provider: str) -> dg.DynamicPartitionsDefinition:
    """Shared by every sync of ``provider``: a connection is one partition of each of its assets."""
    return dg.DynamicPartitionsDefinition(name=partitions_name(provider))


def concurrency_tag(sync_key: str, connection_id: str, role: Literal["poll", "drain"]) -> dict[str, str]:
    """The run tag that dagster.yaml limits to one run per unique value: one poll and one drain
    per (sync, connection) at a time, for runs that go through the queue. The role is part of the
    value, as it is of the store's leases, so a queued webhook run never waits behind a poll."""
    return {"sync/asset_partition": f"{sync_key}:{connection_id}:{role}"}


# What define_asset_job returns; Dagster does not export the class at the top level.
AssetJob = Any
