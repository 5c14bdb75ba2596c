"""A small client of the sandbox's /admin API, for tests, ``make run`` and scripts."""

from __future__ import annotations

from typing import Any

import httpx

from sync_project.core.http import json_body
from sync_project.sandbox.chaos import ChaosSettings
from sync_project.sandbox.generator import GeneratorStatus
from sync_project.sandbox.ratelimit import RateLimitSettings
from sync_project.sandbox.webhooks import DeliveryCounts


class SandboxAdmin:
    """Drives a running sandbox; every failure surfaces as a ``ProviderError`` naming the endpoint."""

    def __init__(self, base_url: str, admin_token: str, *, timeout_s: float = 60.0) -> None:
        self._http = httpx.Client(
            base_url=base_url, headers={"authorization": f"Bearer {admin_token}"}, timeout=timeout_s
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> SandboxAdmin:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def create_account(
        self, account_id: str | None = None, *, token: str | None = None, contacts: int = 0, deals: int = 0
    ) -> tuple[str, str]:
        """``(account_id, token)`` of a new account holding ``contacts`` and ``deals`` already."""
        body: dict[str, Any] = {"contacts": contacts, "deals": deals}
        if account_id is not None:
            body["account_id"] = account_id
        if token is not None:
            body["token"] = token
        created = json_body(self._http.post("/admin/accounts", json=body))
        return created["account_id"], created["token"]

    def set_token(self, account_id: str, token: str | None = None) -> str:
        """Give an existing account a new API token (generated when not given); returns it."""
        body = {} if token is None else {"token": token}
        return str(json_body(self._http.post(f"/admin/accounts/{account_id}/token", json=body))["token"])

    def accounts(self) -> dict[str, dict[str, int]]:
        """account id -> live counts (``{"contacts": n, "deals": m}``)."""
        listed = json_body(self._http.get("/admin/accounts"))["accounts"]
        return {row.pop("account_id"): row for row in listed}

    def apply_changes(self, count: int, *, account_id: str | None = None, **mix: float) -> list[dict[str, Any]]:
        """Apply ``count`` random changes now; returns one summary per event (id, type, object_id...)."""
        body: dict[str, Any] = {"count": count, "mix": mix}
        if account_id is not None:
            body["account_id"] = account_id
        return list(json_body(self._http.post("/admin/changes", json=body))["events"])

    def truth(self, account_id: str) -> dict[str, Any]:
        return dict(json_body(self._http.get("/admin/truth", params={"account_id": account_id})))

    def deliveries(self) -> DeliveryCounts:
        return DeliveryCounts.model_validate(json_body(self._http.get("/admin/deliveries")))

    def flush(self, timeout_s: int = 30) -> DeliveryCounts:
        response = self._http.post("/admin/flush", params={"timeout_s": timeout_s}, timeout=timeout_s + 10)
        return DeliveryCounts.model_validate(json_body(response))

    def set_chaos(self, **knobs: Any) -> ChaosSettings:
        return ChaosSettings.model_validate(json_body(self._http.post("/admin/chaos", json=knobs)))

    def generator(self) -> GeneratorStatus:
        return GeneratorStatus.model_validate(json_body(self._http.get("/admin/generator")))

    def set_generator(self, **settings: Any) -> GeneratorStatus:
        return GeneratorStatus.model_validate(json_body(self._http.post("/admin/generator", json=settings)))

    def set_rate_limit(self, **settings: Any) -> RateLimitSettings:
        return RateLimitSettings.model_validate(json_body(self._http.post("/admin/rate-limit", json=settings)))

    def set_webhook_url(self, url: str | None) -> None:
        json_body(self._http.post("/admin/webhook", json={"url": url}))
