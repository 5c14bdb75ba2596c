"""``github/issues``: the issues of one repository, polled by ``updated_at`` and kept live by the
``issues`` webhook. Pull requests (which the issues API lists too) are left out.

Newest-wins on ``updated_at`` orders polled copies and webhook payloads alike. A deletion carries
no time of its own (the payload's ``updated_at`` is the issue's last edit, which a polled copy can
equal), so its tombstone is stamped with when we learned of it, after every copy read before.

Every action GitHub documents for the ``issues`` event applies. GitHub's webhook schemas leave some
fields of the issue out of some actions (``pinned`` and ``unpinned`` may carry no ``state``,
``labels`` or ``locked``): a payload without all of the model's fields is applied as an
:class:`Update` of the fields it has, so what it leaves out keeps its stored value instead of being
reset to a default. An optional field whose value does not fit the model (a shape GitHub adds
later) is treated as left out, never as a failure that would retry and dead-letter the event.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from sync_project.core import (
    Delete,
    FetchContext,
    InboundEvent,
    Page,
    ProviderError,
    Save,
    SyncDefinition,
    Update,
    WebhookChange,
    WebhookContext,
    parse_records,
)
from sync_project.providers import github


class GitHubUser(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: int
    login: str
    type: str | None = None


class GitHubLabel(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: int
    name: str
    color: str | None = None
    description: str | None = None


class GitHubMilestone(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: int
    number: int
    title: str
    state: str


class GitHubIssue(BaseModel):
    """The fields of GitHub's issue object worth keeping; users, labels and milestones trimmed to
    what identifies them, so the REST copy and the webhook copy of one state hash the same."""

    model_config = ConfigDict(extra="ignore")
    id: int
    number: int
    node_id: str
    title: str
    #: Optional in GitHub's schema of some webhook actions (pinned, unpinned), always in the REST API.
    state: str | None = None
    state_reason: str | None = None
    body: str | None = None
    user: GitHubUser | None = None
    labels: list[GitHubLabel] = []
    assignees: list[GitHubUser] = []
    milestone: GitHubMilestone | None = None
    locked: bool = False
    comments: int = 0
    author_association: str | None = None
    html_url: str
    created_at: datetime
    updated_at: datetime
    closed_at: datetime | None = None


#: A redelivery asked for just before the last check may not be listed yet: look this far back.
REDELIVERY_OVERLAP = timedelta(hours=1)


def fetch(ctx: FetchContext) -> Iterator[Page]:
    owner, repo = github.repository(ctx.connection)
    since = ctx.checkpoint.get("since") if ctx.checkpoint else None
    checked_at = redeliver_failed_deliveries(ctx)
    pages = github.list_issues(ctx.client, owner, repo, github.parse_time(since) if since else None)
    for items, resume_at in pages:
        issues = [item for item in items if "pull_request" not in item]
        checkpoint: dict[str, Any] = {"since": github.format_time(resume_at)} if resume_at else {}
        if checked_at is not None:
            checkpoint["deliveries_checked_at"] = checked_at
        yield Page(
            records=parse_records(GitHubIssue, issues, f"github {owner}/{repo} issues"),
            checkpoint=checkpoint or None,
        )


def redeliver_failed_deliveries(ctx: FetchContext) -> str | None:
    """The poll's first step when the connection names its webhook (``config["hook_id"]``): ask
    GitHub to redeliver what we failed to take since the last check (see
    :func:`~sync_project.providers.github.redeliver_failed`). Returns the check's time for the
    checkpoint, or None without a hook. A failure here (say, a token without webhook permission)
    is a warning: the poll itself still runs, and reads what the lost deliveries carried.
    """
    hook = github.hook_path(ctx.connection)
    if hook is None:
        return None
    now = datetime.now(timezone.utc)
    since = now - github.REDELIVERY_WINDOW
    previous = (ctx.checkpoint or {}).get("deliveries_checked_at")
    if previous:
        since = max(since, github.parse_time(previous) - REDELIVERY_OVERLAP)
    try:
        result = github.redeliver_failed(ctx.client, hook, since=since)
    except ProviderError as error:
        ctx.log.warning(f"github/{ctx.connection.connection_id}: redelivery of failed webhooks skipped: {error}")
        return previous
    if result.redelivered or result.refused:
        ctx.log.info(
            f"github/{ctx.connection.connection_id}: asked GitHub to redeliver {len(result.redelivered)} failed "
            f"webhook deliveries ({len(result.refused)} refused) of {result.checked} listed"
        )
    return github.format_time(now)


#: Fields every documented action's issue carries: without one of them it is no issue we can key.
REQUIRED_FIELDS = frozenset(name for name, info in GitHubIssue.model_fields.items() if info.is_required())
#: Fields GitHub's webhook schemas leave optional for some actions (``pinned``, ``unpinned``) whose
#: absence must not reset the stored value. Other optional fields absent from a payload (say
#: ``state_reason``, which older payloads lack) mean what the REST API means by their absence.
OMITTABLE_FIELDS = frozenset({"state", "labels", "locked"})


def on_webhook(ctx: WebhookContext, event: InboundEvent) -> list[WebhookChange]:
    issue: Any = event.payload.get("issue")
    if not isinstance(issue, dict) or "pull_request" in issue:
        return []
    # "transferred" is the old repository's side of a move: the issue is gone from this one.
    if event.payload.get("action") in ("deleted", "transferred"):
        return [Delete({"id": issue["id"], "number": issue.get("number")})]
    parsed, complete = parse_webhook_issue(issue)
    if complete:
        return [Save(parsed)]
    # Only the fields the payload has: the stored copy keeps the rest (and if none is stored yet,
    # the next poll brings the whole issue).
    present = parsed.model_dump(mode="json", include=set(parsed.model_fields_set))
    return [Update(present)]


def parse_webhook_issue(issue: dict[str, Any]) -> tuple[GitHubIssue, bool]:
    """The payload's issue, and whether it is complete enough to replace the stored copy (it has
    every one of :data:`OMITTABLE_FIELDS` and no field was dropped).

    Optional fields that fail validation are dropped (and the result is incomplete); a required
    field that fails raises, since without it the event names no issue we could store.
    """
    raw = dict(issue)
    dropped = False
    for _ in range(len(GitHubIssue.model_fields)):
        try:
            parsed = GitHubIssue.model_validate(raw)
        except ValidationError as error:
            bad = {str(e["loc"][0]) for e in error.errors() if e["loc"]} - REQUIRED_FIELDS
            if not bad:
                raise
            for name in bad:
                raw.pop(name, None)
            dropped = True
            continue
        return parsed, not dropped and OMITTABLE_FIELDS <= parsed.model_fields_set
    raise AssertionError("unreachable: every optional field was dropped")


issues = SyncDefinition(
    provider="github",
    name="issues",
    model=GitHubIssue,
    fetch=fetch,
    description="Issues of one GitHub repository (pull requests excluded).",
    primary_key="id",
    updated_field="updated_at",
    webhook_events=("issues",),
    on_webhook=on_webhook,
    poll_interval=timedelta(minutes=15),
)
