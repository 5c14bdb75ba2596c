"""``github/issues``: the issues of one repository, polled by ``updated_at`` and kept live by the
``issues`` webhook. Pull requests (which the issues API lists too) are left out.

Newest-wins on ``updated_at`` orders polled copies and webhook payloads alike. A deletion carries
no time of its own (the payload's ``updated_at`` is the issue's last edit, which a polled copy can
equal), so its tombstone is stamped with when we learned of it, after every copy read before.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

from pydantic import BaseModel, ConfigDict

from sync_project.core import Delete, FetchContext, InboundEvent, Page, Save, SyncDefinition, WebhookContext
from sync_project.core.sync import WebhookChange
from sync_project.providers import github
from sync_project.providers._common import parse_records


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
    state: str
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


def fetch(ctx: FetchContext) -> Iterator[Page]:
    owner, repo = github.repository(ctx.connection)
    since = ctx.checkpoint.get("since") if ctx.checkpoint else None
    pages = github.list_issues(ctx.client, owner, repo, github.parse_time(since) if since else None)
    for items, resume_at in pages:
        issues = [item for item in items if "pull_request" not in item]
        yield Page(
            records=parse_records(GitHubIssue, issues, f"github {owner}/{repo} issues"),
            checkpoint={"since": github.format_time(resume_at)} if resume_at else None,
        )


def on_webhook(ctx: WebhookContext, event: InboundEvent) -> list[WebhookChange]:
    issue: Any = event.payload.get("issue")
    if not isinstance(issue, dict) or "pull_request" in issue:
        return []
    # "transferred" is the old repository's side of a move: the issue is gone from this one.
    if event.payload.get("action") in ("deleted", "transferred"):
        return [Delete({"id": issue["id"], "number": issue.get("number")})]
    return [Save(GitHubIssue.model_validate(issue))]


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
