"""``github/issues``: the issues of one repository and their comments, polled by ``updated_at`` and
kept live by the ``issues`` and ``issue_comment`` webhooks. Pull requests (which the issues API lists
too) are left out; comments are kept whatever they comment on (GitHub lists pull request
conversation comments as issue comments, and their ``issue_url`` says which).

Two models from one fetch: ``github/issues`` (the asset ``github/issues``) and
``github/issue_comments`` (the asset ``github/issue_comments``), each with its own records, change
feed and counts. A poll reads the issues, then the repository's comments (one list for all issues,
``GET /repos/{owner}/{repo}/issues/comments``), under one checkpoint: ``since`` for issues,
``comments_since`` for comments. An ``issue_comment`` delivery changes both: the comment, and the
issue it carries (its comment count moved).

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
    SyncModel,
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


class GitHubIssueComment(BaseModel):
    """GitHub's issue comment object, trimmed as issues are; ``issue_number`` is read off
    ``issue_url`` (the list gives no other link to the issue)."""

    model_config = ConfigDict(extra="ignore")
    id: int
    node_id: str
    body: str | None = None
    user: GitHubUser | None = None
    author_association: str | None = None
    html_url: str
    issue_url: str
    issue_number: int | None = None
    created_at: datetime
    updated_at: datetime

    def model_post_init(self, _context: Any) -> None:
        if self.issue_number is None:
            tail = self.issue_url.rstrip("/").rsplit("/", 1)[-1]
            self.issue_number = int(tail) if tail.isdigit() else None


#: The comments model: records ``github/issue_comments``, asset ``github/issue_comments``.
COMMENTS = "issue_comments"
#: A redelivery asked for just before the last check may not be listed yet: look this far back.
REDELIVERY_OVERLAP = timedelta(hours=1)


def fetch(ctx: FetchContext) -> Iterator[Page]:
    """Issues from ``since``, then comments from ``comments_since``: every page's checkpoint holds
    both, so a run killed among the comments resumes there (re-reading only the issues updated
    since, which are few), and one killed among the issues still reads the comments it had not."""
    owner, repo = github.repository(ctx.connection)
    previous = ctx.checkpoint or {}
    checked_at = redeliver_failed_deliveries(ctx)
    position: dict[str, Any] = {key: previous[key] for key in ("since", "comments_since") if previous.get(key)}

    def checkpoint() -> dict[str, Any] | None:
        current = dict(position)
        if checked_at is not None:
            current["deliveries_checked_at"] = checked_at
        return current or None

    since = previous.get("since")
    for items, resume_at in github.list_issues(ctx.client, owner, repo, github.parse_time(since) if since else None):
        issues = [item for item in items if "pull_request" not in item]
        if resume_at:
            position["since"] = github.format_time(resume_at)
        yield Page(records=parse_records(GitHubIssue, issues, f"github {owner}/{repo} issues"), checkpoint=checkpoint())
    comments_since = previous.get("comments_since")
    for items, resume_at in github.list_issue_comments(
        ctx.client, owner, repo, github.parse_time(comments_since) if comments_since else None
    ):
        if resume_at:
            position["comments_since"] = github.format_time(resume_at)
        yield Page(
            records=parse_records(GitHubIssueComment, items, f"github {owner}/{repo} issue comments"),
            checkpoint=checkpoint(),
            model=COMMENTS,
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
    if event.event_type == "issue_comment":
        return on_comment(ctx, event)
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


def on_comment(ctx: WebhookContext, event: InboundEvent) -> list[WebhookChange]:
    """``issue_comment`` (created, edited, deleted): the comment, and the issue it carries, whose
    ``comments`` count and ``updated_at`` moved with it (saved under the same newest-wins rule, so
    an older copy of the issue changes nothing)."""
    comment: Any = event.payload.get("comment")
    if not isinstance(comment, dict):
        return []
    changes: list[WebhookChange] = []
    if event.payload.get("action") == "deleted":
        changes.append(Delete({"id": comment["id"]}, model=COMMENTS))
    else:
        changes.append(Save(GitHubIssueComment.model_validate(comment), model=COMMENTS))
    issue: Any = event.payload.get("issue")
    if isinstance(issue, dict) and "pull_request" not in issue:
        parsed, complete = parse_webhook_issue(issue)
        changes.append(
            Save(parsed) if complete else Update(parsed.model_dump(mode="json", include=set(parsed.model_fields_set)))
        )
    return changes


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
    webhook_events=("issues", "issue_comment"),
    on_webhook=on_webhook,
    poll_interval=timedelta(minutes=15),
    models=(
        SyncModel(
            name=COMMENTS,
            model=GitHubIssueComment,
            updated_field="updated_at",
            description="Comments on the issues (and pull requests) of one GitHub repository.",
        ),
    ),
)
