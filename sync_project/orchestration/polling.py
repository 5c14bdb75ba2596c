"""Polling a provider page by page into the store (no Dagster here: the asset calls this).

Each page is merged and its checkpoint stored in one transaction, so a run killed after page k
resumes at page k+1 and loses nothing. Pages stream: nothing accumulates across pages.

One page runs ahead: while page k's transaction runs, a fetch thread requests page k+1 and
prepares it (validates, encodes, hashes). The provider's latency and the encoding then overlap the
database's work instead of adding to it, and memory holds at most two pages. Pages still commit in
order, and a fetch error surfaces only after every page before it has committed.

A full refresh is a *window* (:class:`~sync_project.store.FullWindow`): opened by its first
run, checkpointed with every page in a state of its own (incremental runs keep theirs meanwhile),
and closed by the run that commits its last page, which then detects deletes over the whole
window. A full run that finds a window open resumes it; one killed, failed or fenced off leaves it
open and deletes nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx

from sync_project.core.clock import utcnow
from sync_project.core.sync import FetchContext, FetchMode, Page, SyncDefinition
from sync_project.store import (
    FullWindow,
    Lease,
    LeaseKeeper,
    MergeResult,
    PreparedBatch,
    ProviderConnection,
    Store,
    prepare,
)


@dataclass
class PollResult:
    merge: MergeResult = field(default_factory=MergeResult)
    pages: int = 0
    records: int = 0
    checkpoint: dict[str, Any] | None = None
    #: Tombstoned by delete detection after a complete full refresh.
    deleted_unseen: int = 0
    #: A sync of several models: the counts of each further model, by its store key (``merge``
    #: and ``records`` are the sync's own model's; ``pages`` counts every page).
    models: dict[str, MergeResult] = field(default_factory=dict)
    #: Full runs: the refresh window as this run left it, and whether this run completed it.
    window: FullWindow | None = None
    window_completed: bool = False


@dataclass(frozen=True)
class _FetchedPage:
    page: Page
    key: str
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
    model_keepers: Mapping[str, LeaseKeeper] | None = None,
) -> PollResult:
    """Fetch (all, or from the checkpoint), merging every page; then detect deletes if full.

    With ``keeper`` (the run's poll lease), every page's transaction and the delete detection are
    fenced by it: a run that lost its lease raises :class:`~sync_project.store.LeaseLostError`
    before writing anything more, and a full refresh that lost it never detects deletes. A sync of
    several models writes each model's records under that model's own lease
    (``model_keepers``, by store key), and stores its one checkpoint under its own key.
    """
    state = store.state.get(sync.key, connection.connection_id)
    keepers: dict[str, LeaseKeeper | None] = {sync.key: keeper, **(model_keepers or {})}
    window: FullWindow | None = None
    if mode == "full":
        open_window = state.full_window if state else None
        if open_window is not None:
            window = open_window.model_copy(update={"runs": open_window.runs + 1})
            log.info(
                f"{sync.key} {connection.connection_id}: resuming the full refresh started "
                f"{window.started_at.isoformat()} after {window.pages} pages ({window.runs - 1} runs before this one)"
            )
        else:
            # Stamped before the first request: delete detection spares whatever was written after.
            window = FullWindow(window_id=run_id, started_at=utcnow())
        with store.writer(
            sync.key, connection.connection_id, sync.record_spec, lease=_fence(keeper, sync.key, keepers)
        ) as writer:
            writer.save_window(window)
        checkpoint = window.checkpoint
    else:
        checkpoint = state.checkpoint if state else None
    result = PollResult(checkpoint=checkpoint, window=window)
    pages = iter(sync.fetch(FetchContext(client, connection, mode, checkpoint, log)))

    def fetch_next() -> _FetchedPage | None:
        # Stamped before the request: ignore_if_modified_after compares stored writes with the
        # moment we *read*, and a later stamp would let a stale page beat a webhook write.
        fetched_at = utcnow()
        page = next(pages, None)
        if page is None:
            return None
        key, spec = sync.model_key(page.model), sync.model_spec(page.model)
        deleted = prepare("delete", page.deleted, spec, fetched_at=fetched_at) if page.deleted else None
        return _FetchedPage(page, key, prepare("save", page.records, spec, fetched_at=fetched_at), deleted)

    # One worker: the fetch generator is only ever advanced by one thread, one page at a time.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"fetch {sync.key}") as fetcher:
        upcoming = fetcher.submit(fetch_next)
        while (fetched := upcoming.result()) is not None:
            upcoming = fetcher.submit(fetch_next)
            page = fetched.page
            lease = _fence(keepers.get(fetched.key), fetched.key, keepers)
            with store.writer(fetched.key, connection.connection_id, fetched.records.spec, lease=lease) as writer:
                merged = writer.save(fetched.records, seen_by_run=window.window_id if window else None)
                if fetched.deleted is not None:
                    merged += writer.delete(fetched.deleted)
                if window is not None:
                    # The window holds the refresh's checkpoint; incremental runs keep theirs.
                    window = window.model_copy(
                        update={
                            "pages": window.pages + 1,
                            "records": window.records + len(page.records),
                            "checkpoint": window.checkpoint if page.checkpoint is None else page.checkpoint,
                        }
                    )
                    writer.save_window(window, sync=sync.key)
                elif page.checkpoint is not None:
                    writer.set_checkpoint(page.checkpoint, sync=sync.key)
            result.window = window
            result.pages += 1
            if fetched.key != sync.key:
                result.models.setdefault(fetched.key, MergeResult())
                result.models[fetched.key] += merged
                log.info(
                    f"{fetched.key} {connection.connection_id}: page {result.pages}: {len(page.records)} records "
                    f"(+{merged.added} ~{merged.updated} -{merged.deleted} ={merged.unchanged})"
                )
                continue
            result.records += len(page.records)
            result.merge += merged
            if page.checkpoint is not None:
                result.checkpoint = page.checkpoint
            log.info(
                f"{sync.key} {connection.connection_id}: page {result.pages}: {len(page.records)} records "
                f"(+{merged.added} ~{merged.updated} -{merged.deleted} ={merged.unchanged} "
                f"stale {merged.skipped_stale}); {result.records} so far"
            )
    if window is not None:
        # The further models first: the sync's own transaction closes the window, so a run killed
        # in between leaves it open and the next run detects their deletes again (idempotent).
        for model in sync.models:
            key = sync.model_key(model.name)
            deleted = 0
            if model.track_deletes:
                with store.writer(
                    key, connection.connection_id, model.record_spec, lease=_fence(keepers.get(key), key, keepers)
                ) as writer:
                    deleted = writer.delete_unseen(window.window_id, window.started_at)
            result.models.setdefault(key, MergeResult()).deleted += deleted
            log.info(f"{key} {connection.connection_id}: full refresh tombstoned {deleted} vanished records")
        with store.writer(
            sync.key, connection.connection_id, sync.record_spec, lease=_fence(keeper, sync.key, keepers)
        ) as writer:
            result.deleted_unseen = writer.close_window(window, detect_deletes=sync.track_deletes)
        result.window_completed = True
        result.merge.deleted += result.deleted_unseen
        log.info(
            f"{sync.key} {connection.connection_id}: full refresh complete ({window.pages} pages in "
            f"{window.runs} run(s) since {window.started_at.isoformat()}); tombstoned {result.deleted_unseen} vanished records"
        )
    for model in sync.models:  # every model has its counts, pages or none
        result.models.setdefault(sync.model_key(model.name), MergeResult())
    return result


def _fence(keeper: LeaseKeeper | None, key: str, keepers: Mapping[str, LeaseKeeper | None]) -> Lease | None:
    """The lease a write of ``key`` proves current; a run fenced for its sync holds one per model."""
    if keeper is None:
        if any(k is not None for k in keepers.values()):
            raise ValueError(f"this run holds no lease for {key}")
        return None
    keeper.check()
    return keeper.lease
