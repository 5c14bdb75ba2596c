"""One dynamic partition per connection, one partitions definition per provider."""

from __future__ import annotations

from collections.abc import Mapping
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


#: Tags every webhook run with its (sync, connection), whichever drain slot it queues in.
DRAIN_PARTITION_TAG = "sync/drain_partition"
#: Drain slots per (sync, connection): the standing drainer, its successor (started before the
#: drainer ends, so the partition is never without one), and a replacement for a drainer whose
#: worker died but whose run Dagster still counts as started until run monitoring fails it.
DRAIN_SLOTS = 3


def drain_tags(sync_key: str, connection_id: str, slot: int = 0) -> dict[str, str]:
    """The tags that queue a webhook run in ``slot`` of its partition (slot 0 is the drain tag of
    :func:`concurrency_tag`): dagster.yaml's one-run-per-value limit then allows a drainer and
    its successor to overlap, and never two runs in one slot."""
    if not 0 <= slot < DRAIN_SLOTS:
        raise ValueError(f"drain slot {slot} is not in 0..{DRAIN_SLOTS - 1}")
    value = concurrency_tag(sync_key, connection_id, "drain")["sync/asset_partition"]
    if slot:
        value = f"{value}.{slot}"
    return {"sync/asset_partition": value, DRAIN_PARTITION_TAG: f"{sync_key}:{connection_id}"}


def drain_partition_of(tags: Mapping[str, str]) -> str | None:
    """``sync:connection`` of a webhook run from its slot tag, or None for a run of no drain slot."""
    value = tags.get("sync/asset_partition", "")
    head, _, role = value.rpartition(":")
    return head if head and (role == "drain" or role.startswith("drain.")) else None


def drain_slot(tags: Mapping[str, str]) -> int:
    """The drain slot a webhook run's tags put it in (0 for runs from before slots existed)."""
    value = tags.get("sync/asset_partition", "")
    head, dot, tail = value.rpartition(".")
    if dot and head.endswith(":drain") and tail.isdigit():
        return int(tail)
    return 0


# What define_asset_job returns; Dagster does not export the class at the top level.
AssetJob = Any
