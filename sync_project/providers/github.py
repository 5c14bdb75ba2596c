"""GitHub: one connection per repository; REST client, issue pagination, rate limits, webhooks.

Routing: a webhook's account id is the repository's ``full_name`` (``owner/repo``, spelled as GitHub
spells it), so a connection is added with ``--account-id owner/repo``. Repository, organization and
GitHub App webhooks all carry ``repository.full_name``, so one App installation covering many
repositories routes each delivery to its repository's connection, which routing by installation id
could not do. Deliveries without a repository (``ping`` from an organization hook, installation
events) get no account id; no sync subscribes to them.

Which repository a connection syncs: ``config["owner"]``/``config["repo"]`` when set, else its
account id. ``config["base_url"]`` points at GitHub Enterprise Server (``https://HOST/api/v3``).
``config["hook_id"]`` (and ``config["hook_org"]`` for an organization hook) names the webhook whose
failed deliveries each poll asks GitHub to redeliver (:func:`redeliver_failed`).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict

from sync_project.core import (
    InboundEvent,
    ListPage,
    MalformedWebhookError,
    Provider,
    ProviderConnection,
    ProviderError,
    SignatureError,
    Sleep,
    WebhookRequest,
    json_body,
    link_pages,
    load_json,
    make_client,
    next_link,
    parse_records,
    parse_retry_after,
    server_time,
    signing,
    time_window_pages,
)

if TYPE_CHECKING:
    import httpx

API_VERSION = "2022-11-28"
SIGNATURE_HEADER = "x-hub-signature-256"
PAGE_SIZE = 100
#: GitHub documents ``since`` as "updated after" with second resolution and leaves its
#: inclusiveness unsaid: restart one second early so a tie at the boundary is never lost.
SINCE_OVERLAP = timedelta(seconds=1)
#: Reads can come from replicas that lag a write by a moment; checkpoints stay this far behind.
CHECKPOINT_LAG = timedelta(minutes=1)
#: GitHub: "wait for at least one minute" after a secondary rate limit without Retry-After.
SECONDARY_LIMIT_WAIT_S = 60.0


class GitHubRateLimited(ProviderError):
    """GitHub's rate limit outlasts what one run is willing to wait."""


def rate_limit_wait(response: httpx.Response, attempt: int, now: float) -> float | None:
    """Seconds GitHub asks us to wait before retrying, or None if ``response`` is no rate limit.

    Per GitHub's REST docs: a 403 or 429 with ``retry-after`` means wait that long; with
    ``x-ratelimit-remaining: 0`` wait until ``x-ratelimit-reset`` (UTC epoch seconds); a secondary
    limit without either header means at least a minute, growing exponentially. Any other 403 is a
    permission problem and not retried.
    """
    if response.status_code not in (403, 429):
        return None
    retry_after = parse_retry_after(response.headers.get("retry-after"))
    if retry_after is not None:
        return retry_after
    reset = response.headers.get("x-ratelimit-reset")
    if response.headers.get("x-ratelimit-remaining") == "0" and reset and reset.isdigit():
        # One second past the reset: the header has second resolution.
        return max(0.0, int(reset) - now) + 1.0
    response.read()
    if response.status_code == 429 or "secondary rate limit" in response.text.lower():
        return SECONDARY_LIMIT_WAIT_S * 2 ** (attempt - 1)
    return None


def rate_limited(
    request: httpx.Request, response: httpx.Response, wait_s: float, attempts: int, *, max_wait_s: float
) -> GitHubRateLimited:
    """The error for a rate limit that outlasts what a run waits (``max_wait_s`` per request)."""
    return GitHubRateLimited(
        f"{request.method} {request.url.copy_with(query=None)}: GitHub rate limit "
        f"(HTTP {response.status_code}) asks to wait {wait_s:.0f} s; this run waits at most "
        f"{max_wait_s:.0f} s per request and tried {attempts} time(s): "
        f"the next run continues from the checkpoint"
    )


@dataclass
class GitHubProvider(Provider):
    name: str = "github"
    webhook_secret_env: str | None = "SYNC_GITHUB_WEBHOOK_SECRET"
    default_base_url: str = "https://api.github.com"
    #: Tests serve fixtures through these; production uses real HTTP and real sleeps.
    transport: httpx.BaseTransport | None = None
    sleep: Sleep = time.sleep
    clock: Callable[[], float] = time.time
    #: The longest one request waits for a rate limit to reset before the run fails.
    max_rate_limit_wait_s: float = 900.0

    def client(self, connection: ProviderConnection) -> httpx.Client:
        headers = {
            "Accept": "application/vnd.github+json",
            "X-GitHub-Api-Version": API_VERSION,
            "User-Agent": "sync-project",
        }
        # A token is optional: public repositories can be read anonymously (60 requests an hour).
        token = connection.credentials()
        if token:
            headers["Authorization"] = f"Bearer {token}"
        # Here, not at the top: the transports need httpx, which the code location does not load.
        from sync_project.core.transports import RateLimitTransport

        # Under the generic retries, which would come back within seconds: GitHub warns that
        # requests made while limited can get an integration banned.

        limits = RateLimitTransport(
            self.transport,
            wait_for=rate_limit_wait,
            give_up=functools.partial(rate_limited, max_wait_s=self.max_rate_limit_wait_s),
            sleep=self.sleep,
            clock=self.clock,
            max_wait_s=self.max_rate_limit_wait_s,
        )
        base_url = str(connection.config.get("base_url") or self.default_base_url)
        return make_client(base_url, headers=headers, transport=limits, sleep=self.sleep)

    def verify(self, request: WebhookRequest, secrets: list[str]) -> None:
        """``X-Hub-Signature-256: sha256=<hex HMAC-SHA256(secret, raw body)>``; GitHub signs no
        timestamp, so replays are caught by the delivery id instead (the inbox stores each once)."""
        signing.require_secrets(secrets, self.webhook_secret_env)
        header = request.headers.get(SIGNATURE_HEADER)
        if not header:
            raise SignatureError("missing X-Hub-Signature-256 header")
        scheme, _, given = header.partition("=")
        if scheme != "sha256" or not given:
            raise SignatureError("X-Hub-Signature-256 is not of the form sha256=<hex>")
        expected = [signing.hmac_sha256(secret, request.body).hex() for secret in secrets]
        if not signing.matches_any(given, expected):
            raise SignatureError("X-Hub-Signature-256 does not match the body under any configured secret")

    def parse(self, request: WebhookRequest) -> list[InboundEvent]:
        delivery = request.headers.get("x-github-delivery")
        event_type = request.headers.get("x-github-event")
        if not delivery or not event_type:
            raise MalformedWebhookError("missing X-GitHub-Delivery or X-GitHub-Event header")
        payload = load_json(request.body)
        if not isinstance(payload, dict):
            raise MalformedWebhookError("GitHub delivers one JSON object per request")
        repository = payload.get("repository")
        account = repository.get("full_name") if isinstance(repository, dict) else None
        return [
            InboundEvent(
                event_key=delivery,
                event_type=event_type,
                account_id=account if isinstance(account, str) and account else None,
                payload=payload,
            )
        ]


def repository(connection: ProviderConnection) -> tuple[str, str]:
    """(owner, repo) of a connection: from its config, else its ``owner/repo`` account id."""
    owner = connection.config.get("owner")
    repo = connection.config.get("repo")
    if not (owner and repo) and connection.account_id and connection.account_id.count("/") == 1:
        owner, repo = connection.account_id.split("/")
    if not (owner and repo):
        raise ProviderError(
            f"connection github/{connection.connection_id}: no repository; add it with "
            f"--account-id OWNER/REPO (or config owner and repo)"
        )
    return str(owner), str(repo)


def list_issues(
    client: httpx.Client, owner: str, repo: str, since: datetime | None
) -> Iterator[tuple[list[dict[str, Any]], datetime | None]]:
    """The repository's issues and pull requests updated at or after ``since``, oldest update first,
    one API page at a time with the checkpoint to resume from (see
    :func:`~sync_project.core.pagination.time_window_pages`).

    ``GET /repos/{owner}/{repo}/issues?state=all&sort=updated&direction=asc&since=`` with the
    ``Link`` header's ``rel="next"`` when a page does not advance the timestamp.
    """

    yield from _list_updated(client, f"/repos/{owner}/{repo}/issues", {"state": "all"}, since, "issues")


def list_issue_comments(
    client: httpx.Client, owner: str, repo: str, since: datetime | None
) -> Iterator[tuple[list[dict[str, Any]], datetime | None]]:
    """Every issue (and pull request) comment of the repository updated at or after ``since``,
    oldest update first, as :func:`list_issues` pages issues.

    ``GET /repos/{owner}/{repo}/issues/comments?sort=updated&direction=asc&since=``: one list for
    the whole repository, so a poll reads the comments of every issue without a request per issue.
    """
    yield from _list_updated(client, f"/repos/{owner}/{repo}/issues/comments", {}, since, "issue comments")


def _list_updated(
    client: httpx.Client, path: str, extra: dict[str, str], since: datetime | None, what: str
) -> Iterator[tuple[list[dict[str, Any]], datetime | None]]:
    def fetch_page(anchor: datetime | None, cursor: str | None) -> ListPage:
        if cursor is not None:
            response = client.get(cursor)
        else:
            params: dict[str, str | int] = {**extra, "sort": "updated", "direction": "asc", "per_page": PAGE_SIZE}
            if anchor is not None:
                params["since"] = format_time(anchor)
            response = client.get(path, params=params)
        items = json_body(response)
        if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
            raise ProviderError(f"GET {response.request.url.path}: expected a JSON array of {what}")
        return ListPage(items, next_link(response), server_time(response))

    pages = time_window_pages(fetch_page, _updated_at, since, overlap=SINCE_OVERLAP, lag=CHECKPOINT_LAG)
    for page, resume_at in pages:
        yield page.items, resume_at


# -- redelivery of failed webhook deliveries -------------------------------------------------------

#: GitHub redelivers only deliveries of the past three days.
REDELIVERY_WINDOW = timedelta(days=3)
#: Deliveries read per page of the list (GitHub's maximum), and pages read per check at most.
DELIVERIES_PAGE_SIZE = 100
MAX_DELIVERY_PAGES = 50


class HookDelivery(BaseModel):
    """One attempt in ``GET .../hooks/{hook_id}/deliveries`` (fields we use; GitHub sends more)."""

    model_config = ConfigDict(extra="ignore")
    id: int
    guid: str
    delivered_at: datetime
    redelivery: bool
    #: The receiver's HTTP status; 0 when GitHub got no answer (a timeout, a refused connection).
    status_code: int
    event: str
    action: str | None = None

    @property
    def succeeded(self) -> bool:
        return 200 <= self.status_code < 300


@dataclass(frozen=True)
class RedeliveryResult:
    checked: int
    #: Delivery ids GitHub was asked to redeliver.
    redelivered: tuple[int, ...]
    #: Asks GitHub refused (id, HTTP status): logged, not retried until the next check.
    refused: tuple[tuple[int, int], ...] = ()


def hook_path(connection: ProviderConnection) -> str | None:
    """The REST path of the connection's webhook: ``config["hook_id"]`` on its repository, or on
    ``config["hook_org"]`` for an organization hook. None when no hook is configured."""
    hook_id = connection.config.get("hook_id")
    if hook_id is None:
        return None
    if not str(hook_id).isdigit():
        raise ProviderError(f"connection github/{connection.connection_id}: config hook_id must be a number")
    org = connection.config.get("hook_org")
    if org:
        return f"/orgs/{org}/hooks/{hook_id}"
    owner, repo = repository(connection)
    return f"/repos/{owner}/{repo}/hooks/{hook_id}"


def redeliver_failed(client: httpx.Client, hook: str, *, since: datetime) -> RedeliveryResult:
    """Ask GitHub to redeliver each delivery since ``since`` that no attempt answered with a 2xx,
    once: GitHub never retries a failed delivery itself, so a 5xx we answered (database down, a
    deploy) would otherwise lose the event until a poll reads it again.

    ``GET {hook}/deliveries`` lists attempts newest first (``cursor`` pagination through the
    ``Link`` header); attempts of one event share a ``guid``. An event is redelivered only if none
    of its attempts succeeded and none is a redelivery already, which makes the check idempotent
    without state of its own: a second check sees the redelivery (whatever it answered) and leaves
    the event alone. ``POST {hook}/deliveries/{id}/attempts`` asks for one (202).
    """
    attempts: dict[str, list[HookDelivery]] = {}
    pages = link_pages(
        client,
        f"{hook}/deliveries",
        {"per_page": DELIVERIES_PAGE_SIZE},
        lambda response: _list_of_objects(response, "deliveries"),
    )
    for _, listed in zip(range(MAX_DELIVERY_PAGES), pages, strict=False):
        page = parse_records(HookDelivery, listed.items, f"GET {hook}/deliveries")
        for delivery in page:
            attempts.setdefault(delivery.guid, []).append(delivery)
        if not page or page[-1].delivered_at < since:
            break
    redelivered: list[int] = []
    refused: list[tuple[int, int]] = []
    for guid_attempts in attempts.values():
        if any(a.succeeded or a.redelivery for a in guid_attempts):
            continue
        newest = max(guid_attempts, key=lambda a: (a.delivered_at, a.id))
        if newest.delivered_at < since:
            continue
        answer = client.post(f"{hook}/deliveries/{newest.id}/attempts")
        if answer.status_code in (401, 403, 404):
            json_body(answer)  # raises naming the credentials problem: no point asking for the rest
        if 200 <= answer.status_code < 300:
            redelivered.append(newest.id)
        else:
            refused.append((newest.id, answer.status_code))
    return RedeliveryResult(sum(len(a) for a in attempts.values()), tuple(redelivered), tuple(refused))


def _list_of_objects(response: httpx.Response, what: str) -> list[dict[str, Any]]:
    items = json_body(response)
    if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
        raise ProviderError(f"GET {response.request.url.path}: expected a JSON array of {what}")
    return items


def _updated_at(item: dict[str, Any]) -> datetime:
    try:
        return parse_time(item["updated_at"])
    except (KeyError, TypeError, ValueError):
        raise ProviderError(f"issue {item.get('id')!r} has no readable updated_at") from None


def format_time(value: datetime) -> str:
    """GitHub's ``YYYY-MM-DDTHH:MM:SSZ``."""
    return value.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).astimezone(timezone.utc)


PROVIDER = GitHubProvider()
