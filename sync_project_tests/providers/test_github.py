"""GitHub provider and ``github/issues``: issue pagination against a fake of the REST API serving the
documented issue objects, rate limits, auth errors, webhook signatures, parsing and mappings."""

from __future__ import annotations

import copy
import hashlib
import hmac
from datetime import datetime, timedelta, timezone
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest
from pydantic import ValidationError

from sync_project.core import Delete, InboundEvent, MalformedWebhookError, Page, Save, SignatureError, Update
from sync_project.core.http import ProviderAuthError, ProviderError
from sync_project.providers.github import GitHubProvider, GitHubRateLimited
from sync_project.syncs import github_issues
from sync_project_tests.providers._support import (
    Sleeps,
    apply_changes,
    connection,
    epoch,
    fetch_context,
    fixture,
    fixture_bytes,
    http_date,
    json_response,
    merge_pages,
    webhook,
    webhook_context,
)

TOKEN_ENV = "SYNC_TEST_GITHUB_TOKEN"
TOKEN = "ghp_16C7e42F292c6912E7710c838347Ae178B4a"
REPO_ID = 1296269


class FakeGitHub:
    """``GET /repos/{owner}/{repo}/issues`` as GitHub answers it: sorted by ``updated_at``, filtered
    by ``since`` (inclusive), paged by ``page`` with a ``Link`` header whose next URL, as GitHub's
    does, names the repository by id. Pages are small so a handful of fixtures spans several."""

    def __init__(
        self,
        issues: list[dict[str, Any]],
        *,
        page_size: int = 2,
        now: str = "2024-06-01T12:00:00Z",
        comments: list[dict[str, Any]] | None = None,
    ) -> None:
        self.issues = copy.deepcopy(issues)
        #: ``GET /repos/{owner}/{repo}/issues/comments``, served the same way.
        self.comments = copy.deepcopy(comments or [])
        self.page_size = page_size
        self.now = epoch(now)
        self.requests: list[httpx.Request] = []
        self.comment_requests: list[httpx.Request] = []
        #: Responses served before the normal ones (rate limits, errors).
        self.scripted: list[httpx.Response] = []
        self.after_request: Any = None

    def __call__(self, request: httpx.Request) -> httpx.Response:
        comments = request.url.path.endswith("/issues/comments")
        (self.comment_requests if comments else self.requests).append(request)
        if self.scripted:
            return self.scripted.pop(0)
        if comments:
            assert request.url.path in (
                "/repos/octocat/Hello-World/issues/comments",
                f"/repositories/{REPO_ID}/issues/comments",
            )
        else:
            assert request.url.path in ("/repos/octocat/Hello-World/issues", f"/repositories/{REPO_ID}/issues")
        params = dict(request.url.params)
        rows = sorted(self.comments if comments else self.issues, key=lambda issue: (issue["updated_at"], issue["id"]))
        if "since" in params:
            rows = [row for row in rows if row["updated_at"] >= params["since"]]
        page = int(params.get("page", "1"))
        chunk = rows[(page - 1) * self.page_size : page * self.page_size]
        headers = {"Date": http_date(self.now)}
        if page * self.page_size < len(rows):
            last = -(-len(rows) // self.page_size)
            link = f"https://api.github.com/repositories/{REPO_ID}/issues{'/comments' if comments else ''}?"
            headers["Link"] = (
                f'<{link}{urlencode({**params, "page": page + 1})}>; rel="next", '
                f'<{link}{urlencode({**params, "page": last})}>; rel="last"'
            )
        response = httpx.Response(200, json=chunk, headers=headers)
        if self.after_request:
            self.after_request(self)
        return response


@pytest.fixture
def conn(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    return connection("github", account_id="octocat/Hello-World", credentials_env=TOKEN_ENV)


def run_fetch(fake: FakeGitHub, conn, *, sleeps: Sleeps | None = None, mode: str = "full", checkpoint=None):
    provider = GitHubProvider(transport=httpx.MockTransport(fake), sleep=sleeps if sleeps is not None else Sleeps())
    with provider.client(conn) as client:
        return list(github_issues.fetch(fetch_context(client, conn, mode=mode, checkpoint=checkpoint)))


def query(request: httpx.Request) -> tuple[str | None, str | None]:
    return request.url.params.get("since"), request.url.params.get("page")


# -- pagination ----------------------------------------------------------------------------------


def test_full_fetch_follows_ties_by_link_and_restarts_from_the_newest_update(conn) -> None:
    fake = FakeGitHub(fixture("github/issues.json"))
    pages = run_fetch(fake, conn)

    seen = {issue.id for page in pages for issue in page.records}
    assert seen == {1, 2, 3, 5, 6}, "every issue once or more, and the pull request (id 4) left out"
    # Restart one second early from the newest update seen; follow Link only across a page of ties.
    assert [query(r) for r in fake.requests] == [
        (None, None),
        ("2011-04-22T13:33:47Z", None),
        ("2011-04-22T13:33:47Z", "2"),
        ("2011-04-23T08:59:59Z", None),
        ("2011-04-24T10:14:59Z", None),
    ]
    assert fake.requests[2].url.path == f"/repositories/{REPO_ID}/issues", "the Link URL is followed as given"
    for request in fake.requests:
        assert request.headers["authorization"] == f"Bearer {TOKEN}"
        assert request.headers["accept"] == "application/vnd.github+json"
        assert request.headers["x-github-api-version"] == "2022-11-28"
        params = request.url.params
        assert (params["state"], params["sort"], params["direction"], params["per_page"]) == (
            "all",
            "updated",
            "asc",
            "100",
        )
    checkpoints = [page.checkpoint["since"] for page in pages]
    assert checkpoints == sorted(checkpoints)
    assert checkpoints[-1] == "2011-04-25T16:40:11Z"


def test_an_issue_updated_while_paging_is_not_skipped(conn) -> None:
    """With page numbers alone, the bump below would shift issue 3 onto the page already read."""
    fake = FakeGitHub(fixture("github/issues.json"))

    def bump_issue_1_once(server: FakeGitHub) -> None:
        if len(server.requests) == 1:
            issue = next(i for i in server.issues if i["id"] == 1)
            issue.update(updated_at="2011-04-26T08:00:00Z", title="Found a bug (edited)")
        server.after_request = None

    fake.after_request = bump_issue_1_once
    pages = run_fetch(fake, conn)
    records = [issue for page in pages for issue in page.records]
    assert {issue.id for issue in records} == {1, 2, 3, 5, 6}
    assert [issue.title for issue in records if issue.id == 1][-1] == "Found a bug (edited)"


def test_incremental_starts_at_the_checkpoint_and_stays_a_minute_behind_github(conn) -> None:
    fake = FakeGitHub(fixture("github/issues.json"), now="2011-04-25T16:40:30Z")
    pages = run_fetch(fake, conn, mode="incremental", checkpoint={"since": "2011-04-24T10:14:59Z"})
    assert query(fake.requests[0]) == ("2011-04-24T10:14:59Z", None)
    assert {issue.id for page in pages for issue in page.records} == {5, 6}
    # The newest update (16:40:12) is younger than a minute on GitHub's clock: resume before it.
    assert pages[-1].checkpoint == {"since": "2011-04-25T16:39:30Z"}


def test_the_repository_comes_from_config_before_the_account_id(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeGitHub(fixture("github/issues.json"))
    conn = connection("github", account_id="someone/else", config={"owner": "octocat", "repo": "Hello-World"})
    run_fetch(fake, conn)
    assert fake.requests[0].url.path == "/repos/octocat/Hello-World/issues"
    assert "authorization" not in fake.requests[0].headers, "no credentials: anonymous requests"


def test_a_connection_without_a_repository_is_refused() -> None:
    conn = connection("github", account_id="not-a-repo")
    with pytest.raises(ProviderError, match="--account-id OWNER/REPO"):
        run_fetch(FakeGitHub([]), conn)


# -- rate limits ---------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [403, 429])
def test_primary_rate_limit_waits_until_the_reset_then_succeeds(conn, status: int) -> None:
    fake = FakeGitHub(fixture("github/issues.json"))
    limited = {"x-ratelimit-limit": "5000", "x-ratelimit-remaining": "0", "x-ratelimit-reset": str(int(fake.now) + 42)}
    fake.scripted = [json_response(status, fixture("github/error_rate_limit.json"), now=fake.now, headers=limited)]
    sleeps = Sleeps()
    pages = run_fetch(fake, conn, sleeps=sleeps)
    assert sleeps == [43.0], "until the reset on GitHub's clock (its Date header), plus its second"
    assert query(fake.requests[0]) == query(fake.requests[1]) == (None, None)
    assert {issue.id for page in pages for issue in page.records} == {1, 2, 3, 5, 6}


def test_secondary_rate_limit_honours_retry_after(conn) -> None:
    fake = FakeGitHub(fixture("github/issues.json"))
    body = fixture("github/error_secondary_rate_limit.json")
    fake.scripted = [json_response(403, body, now=fake.now, headers={"retry-after": "30"})]
    sleeps = Sleeps()
    run_fetch(fake, conn, sleeps=sleeps)
    assert sleeps == [30.0]


def test_secondary_rate_limit_without_headers_waits_a_minute_then_longer(conn) -> None:
    fake = FakeGitHub(fixture("github/issues.json"))
    body = fixture("github/error_secondary_rate_limit.json")
    fake.scripted = [json_response(403, body, now=fake.now), json_response(403, body, now=fake.now)]
    sleeps = Sleeps()
    run_fetch(fake, conn, sleeps=sleeps)
    assert sleeps == [60.0, 120.0]


def test_a_reset_beyond_the_bound_fails_with_the_wait_named(conn) -> None:
    # GitHub's documented example: Date 2013-08-20 14:50:41 GMT, reset 1377013266 (50 minutes on).
    fake = FakeGitHub([])
    headers = {
        "Date": "Tue, 20 Aug 2013 14:50:41 GMT",
        "x-ratelimit-limit": "60",
        "x-ratelimit-remaining": "0",
        "x-ratelimit-reset": "1377013266",
    }
    fake.scripted = [httpx.Response(403, json=fixture("github/error_rate_limit.json"), headers=headers)]
    sleeps = Sleeps()
    with pytest.raises(GitHubRateLimited, match=r"wait 3026 s; this run waits at most 900 s"):
        run_fetch(fake, conn, sleeps=sleeps)
    assert sleeps == [] and len(fake.requests) == 1


def test_server_errors_are_retried_honouring_retry_after(conn) -> None:
    fake = FakeGitHub(fixture("github/issues.json"))
    fake.scripted = [httpx.Response(502, text="<html>Bad gateway</html>", headers={"Retry-After": "2"})]
    sleeps = Sleeps()
    pages = run_fetch(fake, conn, sleeps=sleeps)
    assert sleeps == [2.0] and pages


# -- errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "body"), [(401, "github/error_bad_credentials.json"), (403, "github/error_forbidden.json")]
)
def test_auth_failures_raise_a_clear_error_without_retrying(conn, status: int, body: str) -> None:
    fake = FakeGitHub([])
    fake.scripted = [json_response(status, fixture(body), now=fake.now)]
    sleeps = Sleeps()
    with pytest.raises(ProviderAuthError, match=rf"HTTP {status}: check the connection's credentials"):
        run_fetch(fake, conn, sleeps=sleeps)
    assert sleeps == [] and len(fake.requests) == 1


def test_a_body_that_is_not_json_fails_with_the_cause(conn) -> None:
    fake = FakeGitHub([])
    fake.scripted = [httpx.Response(200, text="<html>unicorn</html>")]
    with pytest.raises(ProviderError, match="response is not JSON"):
        run_fetch(fake, conn)


def test_json_of_the_wrong_shape_fails_with_the_cause(conn) -> None:
    fake = FakeGitHub([])
    fake.scripted = [httpx.Response(200, json={"message": "Not an array"})]
    with pytest.raises(ProviderError, match="expected a JSON array of issues"):
        run_fetch(fake, conn)


def test_an_issue_of_the_wrong_shape_fails_naming_it(conn) -> None:
    broken = fixture("github/issues.json")[:1]
    del broken[0]["title"]
    with pytest.raises(ProviderError, match=r"item #0 is not a GitHubIssue"):
        run_fetch(FakeGitHub(broken), conn)


# -- webhook signatures --------------------------------------------------------------------------

NOW = datetime(2024, 6, 1, 12, 0, tzinfo=timezone.utc)
PROVIDER = GitHubProvider()


def signed(body: bytes, secret: str, **extra: str) -> dict[str, str]:
    digest = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return {
        "X-Hub-Signature-256": f"sha256={digest}",
        "X-GitHub-Event": "issues",
        "X-GitHub-Delivery": "72d3162e-cc78-11e3-81ab-4c9367dc0958",
        **extra,
    }


def test_githubs_published_test_vector_verifies() -> None:
    # docs.github.com "Validating webhook deliveries": secret, payload and signature to check against.
    request = webhook(
        b"Hello, World!",
        {"X-Hub-Signature-256": "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"},
        received_at=NOW,
    )
    PROVIDER.verify(request, ["It's a Secret to Everybody"])


def test_a_signature_by_any_configured_secret_verifies() -> None:
    body = fixture_bytes("github/webhook_issues_opened.json")
    PROVIDER.verify(webhook(body, signed(body, "new-secret"), received_at=NOW), ["old-secret", "new-secret"])


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("wrong secret", "does not match"),
        ("altered body", "does not match"),
        ("missing header", "missing X-Hub-Signature-256"),
        ("sha1 scheme", "not of the form sha256=<hex>"),
        ("no secret configured", "no webhook secret configured: set SYNC_GITHUB_WEBHOOK_SECRET"),
    ],
)
def test_signatures_that_must_fail(case: str, expected: str) -> None:
    body = fixture_bytes("github/webhook_issues_opened.json")
    headers = signed(body, "right-secret")
    secrets = ["right-secret"]
    if case == "wrong secret":
        headers = signed(body, "wrong-secret")
    elif case == "altered body":
        body = body.replace(b"Spelling error", b"Spelling errors")
    elif case == "missing header":
        del headers["X-Hub-Signature-256"]
    elif case == "sha1 scheme":
        headers["X-Hub-Signature-256"] = headers["X-Hub-Signature-256"].replace("sha256=", "sha1=")
    else:
        secrets = []
    with pytest.raises(SignatureError, match=expected):
        PROVIDER.verify(webhook(body, headers, received_at=NOW), secrets)


# -- webhook parsing and mapping -----------------------------------------------------------------


def test_parse_keys_the_event_by_delivery_and_routes_by_repository() -> None:
    body = fixture_bytes("github/webhook_issues_opened.json")
    [event] = PROVIDER.parse(webhook(body, signed(body, "s"), received_at=NOW))
    assert event.event_key == "72d3162e-cc78-11e3-81ab-4c9367dc0958"
    assert event.event_type == "issues"
    assert event.account_id == "Codertocat/Hello-World"
    assert event.payload["action"] == "opened"


@pytest.mark.parametrize(
    ("body", "drop", "expected"),
    [
        (b"{not json", None, "body is not JSON"),
        (b"[1, 2]", None, "one JSON object per request"),
        (b"{}", "X-GitHub-Delivery", "missing X-GitHub-Delivery or X-GitHub-Event"),
        (b"{}", "X-GitHub-Event", "missing X-GitHub-Delivery or X-GitHub-Event"),
    ],
)
def test_malformed_deliveries_are_refused(body: bytes, drop: str | None, expected: str) -> None:
    headers = signed(body, "s")
    if drop:
        del headers[drop]
    with pytest.raises(MalformedWebhookError, match=expected):
        PROVIDER.parse(webhook(body, headers, received_at=NOW))


def event_of(name: str) -> InboundEvent:
    payload = fixture(name)
    return InboundEvent("d1", "issues", payload["repository"]["full_name"], payload)


def test_opened_saves_the_issue_as_its_payload_shows_it(conn) -> None:
    [change] = github_issues.on_webhook(webhook_context(None, conn), event_of("github/webhook_issues_opened.json"))  # type: ignore[arg-type]
    assert isinstance(change, Save)
    issue = change.record
    assert (issue.id, issue.number, issue.state) == (444500041, 1, "open")
    assert issue.updated_at == datetime(2019, 5, 15, 15, 20, 18, tzinfo=timezone.utc)
    assert [label.name for label in issue.labels] == ["bug"]
    assert issue.user.login == "Codertocat" and issue.milestone.title == "v1.0"


@pytest.mark.parametrize("name", ["github/webhook_issues_deleted.json", "github/webhook_issues_transferred.json"])
def test_deleted_and_transferred_issues_are_deleted_without_their_stale_timestamp(conn, name: str) -> None:
    event = event_of(name)
    [change] = github_issues.on_webhook(webhook_context(None, conn), event)  # type: ignore[arg-type]
    assert change == Delete({"id": event.payload["issue"]["id"], "number": 1})


def test_a_stale_polled_copy_does_not_resurrect_a_deleted_issue(store, conn) -> None:
    sync = github_issues.issues
    ctx = webhook_context(None, conn)  # type: ignore[arg-type]
    opened = github_issues.on_webhook(ctx, event_of("github/webhook_issues_opened.json"))
    assert apply_changes(store, sync, "c1", opened, fetched_at=NOW).added == 1
    deleted = github_issues.on_webhook(ctx, event_of("github/webhook_issues_deleted.json"))
    assert apply_changes(store, sync, "c1", deleted, fetched_at=NOW + timedelta(minutes=1)).deleted == 1

    # A poll that read the issue before it was deleted reports it still open.
    stale = github_issues.GitHubIssue.model_validate(fixture("github/webhook_issues_deleted.json")["issue"])
    result = merge_pages(store, sync, "c1", [Page(records=[stale])], fetched_at=NOW + timedelta(seconds=30))
    assert result.skipped_stale == 1
    assert store.get(sync.key, "c1", "444500041").deleted_at is not None


# -- every documented action of the issues event -------------------------------------------------

#: Every action GitHub documents for the ``issues`` webhook event, each with a fixture shaped as
#: GitHub's webhook schema for that action describes it.
ISSUE_ACTIONS = (
    "opened", "edited", "closed", "reopened", "assigned", "unassigned", "labeled", "unlabeled",
    "locked", "unlocked", "milestoned", "demilestoned", "pinned", "unpinned", "typed", "untyped",
    "deleted", "transferred",
)  # fmt: skip
#: Actions whose documented issue object may leave fields out (``state`` among them).
PARTIAL_ACTIONS = ("pinned", "unpinned")


@pytest.mark.parametrize("action", ISSUE_ACTIONS)
def test_every_documented_issues_action_applies(conn, action: str) -> None:
    event = event_of(f"github/webhook_issues_{action}.json")
    assert event.payload["action"] == action
    [change] = github_issues.on_webhook(webhook_context(None, conn), event)  # type: ignore[arg-type]
    if action in ("deleted", "transferred"):
        assert isinstance(change, Delete)
    elif action in PARTIAL_ACTIONS:
        assert isinstance(change, Update)
        assert "state" not in change.record and change.record["id"] == 444500041
    else:
        assert isinstance(change, Save) and change.record.state in ("open", "closed")


def test_the_actions_in_sequence_converge_and_a_pin_keeps_the_stored_state(store, conn) -> None:
    sync = github_issues.issues
    ctx = webhook_context(None, conn)  # type: ignore[arg-type]

    def apply(action: str, minutes: int) -> None:
        changes = github_issues.on_webhook(ctx, event_of(f"github/webhook_issues_{action}.json"))
        apply_changes(store, sync, "c1", changes, fetched_at=NOW + timedelta(minutes=minutes))

    apply("opened", 0)
    apply("closed", 1)
    apply("pinned", 2)  # no state in the payload: the stored "closed" stays
    stored = store.get(sync.key, "c1", "444500041")
    assert (stored.data["state"], stored.data["updated_at"]) == ("closed", "2019-05-15T15:31:00Z")
    for minutes, action in enumerate(("reopened", "unpinned", "labeled", "locked", "typed", "untyped"), start=3):
        apply(action, minutes)
    stored = store.get(sync.key, "c1", "444500041")  # as the last (untyped) payload shows it
    assert (stored.data["state"], stored.data["locked"], stored.data["updated_at"]) == (
        "open",
        False,
        "2019-05-15T15:33:00Z",
    )
    apply("deleted", 20)
    assert store.get(sync.key, "c1", "444500041").deleted_at is not None


@pytest.mark.parametrize(
    "field, value",
    [("labels", "not-a-list"), ("milestone", 5), ("locked", {"reason": "x"}), ("user", []), ("state", 7)],
)
def test_an_optional_field_of_an_unexpected_shape_is_left_out_not_a_failure(conn, field: str, value: Any) -> None:
    payload = fixture("github/webhook_issues_edited.json")
    payload["issue"][field] = value
    event = InboundEvent("d1", "issues", "Codertocat/Hello-World", payload)
    [change] = github_issues.on_webhook(webhook_context(None, conn), event)  # type: ignore[arg-type]
    assert isinstance(change, Update)
    assert field not in change.record and change.record["title"] == payload["issue"]["title"]


def test_an_issue_without_an_id_is_not_guessed_at(conn) -> None:
    payload = fixture("github/webhook_issues_edited.json")
    del payload["issue"]["id"]
    with pytest.raises(ValidationError):
        github_issues.on_webhook(webhook_context(None, conn), InboundEvent("d1", "issues", None, payload))  # type: ignore[arg-type]


# -- issue comments: the sync's second model -------------------------------------------------------


def test_one_fetch_yields_the_issues_then_the_comments_under_one_checkpoint(conn) -> None:
    fake = FakeGitHub(fixture("github/issues.json"), comments=fixture("github/issue_comments.json"))
    pages = run_fetch(fake, conn)
    models = [page.model for page in pages]
    assert models == sorted(models, key=lambda m: m is not None) and models[-1] == github_issues.COMMENTS
    comments = [c for page in pages if page.model == github_issues.COMMENTS for c in page.records]
    # Oldest update first (a restart from the newest timestamp reads the boundary again).
    assert list(dict.fromkeys(c.id for c in comments)) == [101, 102, 104, 103, 105]
    assert {c.id: c.issue_number for c in comments}[104] == 1350
    assert {key for page in pages for key in page.checkpoint or {}} == {"since", "comments_since"}
    assert pages[-1].checkpoint == {"since": "2011-04-25T16:40:11Z", "comments_since": "2011-04-25T17:19:59Z"}
    assert all(r.url.params["sort"] == "updated" and r.url.params["direction"] == "asc" for r in fake.comment_requests)

    # Resuming: each list from its own position.
    run_fetch(fake, conn, mode="incremental", checkpoint=pages[-1].checkpoint)
    assert fake.comment_requests[-1].url.params["since"] == "2011-04-25T17:19:59Z"
    assert fake.requests[-1].url.params["since"] == "2011-04-25T16:40:11Z"


def comment_event_of(name: str) -> InboundEvent:
    payload = fixture(name)
    return InboundEvent("d2", "issue_comment", payload["repository"]["full_name"], payload)


def test_a_comment_webhook_changes_the_comment_and_its_issue(conn) -> None:
    created, issue = github_issues.on_webhook(
        webhook_context(None, conn), comment_event_of("github/webhook_issue_comment_created.json")
    )  # type: ignore[arg-type]
    assert isinstance(created, Save) and created.model == github_issues.COMMENTS
    assert (created.record.id, created.record.issue_number, created.record.user.login) == (2001, 1, "Codertocat")
    assert isinstance(issue, Save) and issue.model is None and issue.record.comments == 1
    deleted, issue = github_issues.on_webhook(
        webhook_context(None, conn), comment_event_of("github/webhook_issue_comment_deleted.json")
    )  # type: ignore[arg-type]
    assert isinstance(deleted, Delete) and deleted.model == github_issues.COMMENTS and deleted.record == {"id": 2001}
    assert issue.record.comments == 0
