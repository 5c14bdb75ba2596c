"""Polling a provider page by page into the store (no Dagster here: the asset calls this).

Each page is merged and its checkpoint stored in one transaction, so a run killed after page k
resumes at page k+1 and loses nothing. Pages stream: nothing accumulates across pages.

One page runs ahead: while page k's transaction runs, a fetch thread requests page k+1 and
prepares it (validates, encodes, hashes). The provider's latency and the encoding then overlap the
database's work instead of adding to it, and memory holds at most two pages. Pages still commit in
order, and a fetch error surfaces only after every page before it has committed.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx

from sync_project.core.clock import utcnow
from sync_project.core.sync import FetchContext, FetchMode, Page, SyncDefinition
from sync_project.store import MergeResult, PreparedBatch, ProviderConnection, Store, prepare
from sync_project.store.leases import LeaseKeeper


@dataclass
class PollResult:
    merge: MergeResult = field(default_factory=MergeResult)
    pages: int = 0
    records: int = 0
    checkpoint: dict[str, Any] | None = None
    #: Tombstoned by delete detection after a complete full refresh.
    deleted_unseen: int = 0


@dataclass(frozen=True)
class _FetchedPage:
    page: Page
    records: PreparedBatch
    deleted: PreparedBatch | None


def poll(
    store: Store,
    sync: SyncDefinition,
    connection: ProviderConnection,
    client: httpx.Client,
    log: logging.Logger | Any,
    *,
    mode: FetchMode,
    run_id: str,
    keeper: LeaseKeeper | None = None,
) -> PollResult:
    """Fetch (all, or from the checkpoint), merging every page; then detect deletes if full.

    With ``keeper`` (the run's poll lease), every page's transaction and the delete detection are
    fenced by it: a run that lost its lease raises :class:`~sync_project.store.LeaseLostError`
    before writing anything more, and a full refresh that lost it never detects deletes.
    """
    started_at = utcnow()
    state = store.state.get(sync.key, connection.connection_id)
    checkpoint = state.checkpoint if state and mode == "incremental" else None
    result = PollResult(checkpoint=checkpoint)
    spec = sync.record_spec
    pages = iter(sync.fetch(FetchContext(client, connection, mode, checkpoint, log)))

    def fetch_next() -> _FetchedPage | None:
        # Stamped before the request: ignore_if_modified_after compares stored writes with the
        # moment we *read*, and a later stamp would let a stale page beat a webhook write.
        fetched_at = utcnow()
        page = next(pages, None)
        if page is None:
            return None
        deleted = prepare("delete", page.deleted, spec, fetched_at=fetched_at) if page.deleted else None
        return _FetchedPage(page, prepare("save", page.records, spec, fetched_at=fetched_at), deleted)

    # One worker: the fetch generator is only ever advanced by one thread, one page at a time.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"fetch {sync.key}") as fetcher:
        upcoming = fetcher.submit(fetch_next)
        while (fetched := upcoming.result()) is not None:
            upcoming = fetcher.submit(fetch_next)
            page = fetched.page
            lease = None
            if keeper is not None:
                keeper.check()
                lease = keeper.lease
            with store.writer(sync.key, connection.connection_id, spec, lease=lease) as writer:
                merged = writer.save(fetched.records, seen_by_run=run_id if mode == "full" else None)
                if fetched.deleted is not None:
                    merged += writer.delete(fetched.deleted)
                if page.checkpoint is not None:
                    writer.set_checkpoint(page.checkpoint)
            result.pages += 1
            result.records += len(page.records)
            result.merge += merged
            if page.checkpoint is not None:
                result.checkpoint = page.checkpoint
            log.info(
                f"{sync.key} {connection.connection_id}: page {result.pages}: {len(page.records)} records "
                f"(+{merged.added} ~{merged.updated} -{merged.deleted} ={merged.unchanged} "
                f"stale {merged.skipped_stale}); {result.records} so far"
            )
    if mode == "full" and sync.track_deletes:
        if keeper is not None:
            keeper.check()
        with store.writer(sync.key, connection.connection_id, spec, lease=keeper.lease if keeper else None) as writer:
            result.deleted_unseen = writer.delete_unseen(run_id, started_at)
        result.merge.deleted += result.deleted_unseen
        log.info(f"{sync.key} {connection.connection_id}: full refresh tombstoned {result.deleted_unseen} vanished records")
    return result
