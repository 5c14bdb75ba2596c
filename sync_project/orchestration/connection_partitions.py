"""Connections have one source of truth: the store's connections table. Dagster's dynamic
partitions (``<provider>_connections``, one key per connection) are derived from it.

:func:`partition_drift` compares the two: a connection of the table without its partition is
*missing*, a partition without a connection is *orphaned* (its connection was removed, or someone
added the partition by hand in Dagster: it is never a connection, since schedules, sensors, checks
and the control API read the table). ``connection_partitions_sensor`` (every 30 s, running by
default) adds the missing ones and deletes the orphaned ones, so a connection added or removed
anywhere (the CLI on another host, the store directly) shows in Dagster within its interval;
``connections add``, ``connections remove`` and ``sync-project dev`` apply the same drift to their
provider at once (:func:`reconcile_partitions`), so a new connection is a partition before the
command returns. A removed connection's partition is never re-added: nothing adds a partition
that the table does not have.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import dagster as dg

from sync_project.core import ProviderConnection
from sync_project.orchestration.partitions import connection_partitions, partitions_name
from sync_project.orchestration.resources import StoreResource

if TYPE_CHECKING:
    from sync_project.store import Store

#: How often the sensor reconciles (a connection added elsewhere is a partition within this).
RECONCILE_INTERVAL_S = 30

PartitionsRequest = dg.AddDynamicPartitionsRequest | dg.DeleteDynamicPartitionsRequest


@dataclass(frozen=True)
class PartitionDrift:
    """How one provider's partitions differ from its connections."""

    provider: str
    #: Connections of the table without a partition: added.
    missing: tuple[str, ...] = ()
    #: Partitions without a connection: deleted.
    orphaned: tuple[str, ...] = ()

    def requests(self) -> list[PartitionsRequest]:
        """The sensor's requests that remove this drift."""
        partitions = connection_partitions(self.provider)
        requests: list[PartitionsRequest] = []
        if self.missing:
            requests.append(partitions.build_add_request(list(self.missing)))
        if self.orphaned:
            requests.append(partitions.build_delete_request(list(self.orphaned)))
        return requests


def partition_drift(
    instance: dg.DagsterInstance, connections: Iterable[ProviderConnection], providers: Iterable[str]
) -> list[PartitionDrift]:
    """The drift of each of ``providers`` (those with syncs: they have a partitions definition)
    between its connections in ``connections`` (the table's, paused ones included) and its
    partitions in ``instance``; providers without drift are left out."""
    wanted: dict[str, set[str]] = {provider: set() for provider in providers}
    for connection in connections:
        if connection.provider in wanted:
            wanted[connection.provider].add(connection.connection_id)
    drift = []
    for provider, connection_ids in sorted(wanted.items()):
        existing = set(instance.get_dynamic_partitions(partitions_name(provider)))
        missing, orphaned = sorted(connection_ids - existing), sorted(existing - connection_ids)
        if missing or orphaned:
            drift.append(PartitionDrift(provider, tuple(missing), tuple(orphaned)))
    return drift


def reconcile_partitions(instance: dg.DagsterInstance, store: Store, providers: Sequence[str]) -> list[PartitionDrift]:
    """Make the partitions of ``providers`` those of their connections in ``store``, now (the
    commands' path; the sensor returns the same changes as requests). Returns what it changed."""
    drift = partition_drift(instance, store.connections.list(), providers)
    for found in drift:
        name = partitions_name(found.provider)
        if found.missing:
            instance.add_dynamic_partitions(name, list(found.missing))
        for partition_key in found.orphaned:
            instance.delete_dynamic_partition(name, partition_key)
    return drift


def build_connection_partitions_sensor(providers: Sequence[str]) -> dg.SensorDefinition:
    """``connection_partitions_sensor``: the partitions of ``providers`` follow the table."""
    wanted = sorted(set(providers))

    @dg.sensor(
        name="connection_partitions_sensor",
        minimum_interval_seconds=RECONCILE_INTERVAL_S,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=(
            "Derives each provider's connection partitions from the store's connections table: adds the partition "
            "of every connection, deletes every partition without one (removed, or added by hand in Dagster)."
        ),
    )
    def connection_partitions_sensor(
        context: dg.SensorEvaluationContext, sync_store: StoreResource
    ) -> dg.SensorResult | dg.SkipReason:
        drift = partition_drift(context.instance, sync_store.get_store().connections.list(), wanted)
        if not drift:
            return dg.SkipReason("every connection has its partition, and every partition its connection")
        for found in drift:
            if found.missing:
                context.log.info(f"{found.provider}: adding partitions of connections {', '.join(found.missing)}")
            if found.orphaned:
                context.log.info(
                    f"{found.provider}: deleting partitions without a connection {', '.join(found.orphaned)}"
                )
        return dg.SensorResult(dynamic_partitions_requests=[request for found in drift for request in found.requests()])

    return connection_partitions_sensor
