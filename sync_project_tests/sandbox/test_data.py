"""The sandbox's in-memory model, its rate limiter and its chaos decisions, without HTTP."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from sync_project.sandbox.chaos import Chaos, ChaosSettings, Fate
from sync_project.sandbox.data import (
    ConflictError,
    MonotonicClock,
    SandboxError,
    SandboxState,
    UnknownAccountError,
    format_timestamp,
    parse_timestamp,
)
from sync_project.sandbox.fake import ChangeMix
from sync_project.sandbox.ratelimit import RateLimiter, RateLimitSettings


def test_clock_strictly_increases_when_the_wall_clock_stalls_or_steps_back() -> None:
    wall = [datetime(2024, 5, 1, 12, 0, 0, 999_998, tzinfo=timezone.utc)]
    clock = MonotonicClock(lambda: wall[0])
    first, second = clock.next(), clock.next()
    wall[0] -= timedelta(hours=1)
    third = clock.next()
    assert first < second < third
    # 12:00:01.000000 would print without a fraction; the clock skips it.
    assert third.microsecond != 0
    assert [format_timestamp(t) for t in (first, second, third)] == [
        "2024-05-01T12:00:00.999998Z",
        "2024-05-01T12:00:00.999999Z",
        "2024-05-01T12:00:01.000001Z",
    ]


def test_timestamps_parse_with_or_without_offset() -> None:
    assert parse_timestamp("2024-05-01T12:00:00Z") == datetime(2024, 5, 1, 12, tzinfo=timezone.utc)
    assert parse_timestamp("2024-05-01T14:00:00+02:00") == datetime(2024, 5, 1, 12, tzinfo=timezone.utc)
    assert parse_timestamp("2024-05-01T12:00:00") == datetime(2024, 5, 1, 12, tzinfo=timezone.utc)
    with pytest.raises(SandboxError, match="not an ISO-8601 timestamp"):
        parse_timestamp("yesterday")


def test_same_seed_and_calls_give_the_same_data() -> None:
    def run(seed: int) -> list[tuple[str, str, str]]:
        state = SandboxState(seed=seed)
        state.create_account("acct-1", contacts=5, deals=5)
        events = state.apply_random(50)
        return [(e.type, e.data["id"], e.data.get("email") or e.data.get("name")) for e in events]

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_objects_have_the_documented_fields_and_deals_point_at_contacts() -> None:
    state = SandboxState()
    state.create_account("acct-1", contacts=3, deals=4)
    truth = state.truth("acct-1")
    assert [list(c) for c in truth["contacts"]] == [
        ["id", "email", "first_name", "last_name", "company", "updated_at", "created_at"]
    ] * 3
    assert [list(d) for d in truth["deals"]] == [
        ["id", "name", "amount", "stage", "contact_id", "updated_at", "created_at"]
    ] * 4
    contact_ids = {c["id"] for c in truth["contacts"]}
    assert all(d["contact_id"] in contact_ids for d in truth["deals"])


def test_an_update_changes_content_and_moves_updated_at_forward() -> None:
    state = SandboxState()
    state.create_account("acct-1", contacts=1, deals=1)
    for kind in ("contacts", "deals"):
        before = state.truth("acct-1")[kind][0]
        event = state.update("acct-1", kind, before["id"])
        after = state.get("acct-1", kind, before["id"])
        assert after == event.data
        assert after["updated_at"] > before["updated_at"]
        assert after["created_at"] == before["created_at"]
        assert {k: v for k, v in after.items() if k != "updated_at"} != {
            k: v for k, v in before.items() if k != "updated_at"
        }


def test_a_delete_hides_the_object_and_announces_its_last_state() -> None:
    changes = []
    state = SandboxState(on_change=changes.append)
    state.create_account("acct-1", contacts=2)
    victim = state.truth("acct-1")["contacts"][0]
    event = state.delete("acct-1", "contacts", victim["id"])
    assert event.type == "contact.deleted"
    assert event.data == {**victim, "deleted": True}
    assert event.occurred_at > victim["updated_at"]
    assert changes == [event]
    assert state.get("acct-1", "contacts", victim["id"]) is None
    truth = state.truth("acct-1")
    assert victim["id"] not in [c["id"] for c in truth["contacts"]]
    assert truth["deleted"] == {"contacts": [victim["id"]], "deals": []}
    with pytest.raises(SandboxError, match="no live contact"):
        state.delete("acct-1", "contacts", victim["id"])


def test_seeded_accounts_emit_no_events_but_changes_do() -> None:
    changes = []
    state = SandboxState(on_change=changes.append)
    state.create_account("acct-1", contacts=10, deals=10)
    assert changes == []
    events = state.apply_random(5)
    assert changes == events
    assert {e.account_id for e in events} == {"acct-1"}


def test_changes_only_touch_the_accounts_asked_for() -> None:
    state = SandboxState()
    state.create_account("acct-1", contacts=3)
    state.create_account("acct-2", contacts=3)
    before = state.truth("acct-2")
    events = state.apply_random(20, account_ids=["acct-1"])
    assert {e.account_id for e in events} == {"acct-1"}
    assert state.truth("acct-2") == before


def test_the_mix_decides_the_operations() -> None:
    state = SandboxState()
    state.create_account("acct-1", contacts=5, deals=5)
    only_deletes = state.apply_random(5, mix=ChangeMix(create=0, update=0, delete=1, deal_share=1))
    assert [e.type for e in only_deletes] == ["deal.deleted"] * 5
    # Nothing is left to delete, so a delete creates instead of failing.
    assert state.apply_random(1, mix=ChangeMix(create=0, update=0, delete=1, deal_share=1))[0].type == "deal.created"
    only_contact_creates = state.apply_random(3, mix=ChangeMix(create=1, update=0, delete=0, deal_share=0))
    assert [e.type for e in only_contact_creates] == ["contact.created"] * 3


def test_bad_account_and_change_requests_are_refused_clearly() -> None:
    state = SandboxState()
    with pytest.raises(SandboxError, match="no account to change"):
        state.apply_random(1)
    state.create_account("acct-1", token="token-of-acct-1")
    with pytest.raises(ConflictError, match="already exists"):
        state.create_account("acct-1")
    with pytest.raises(ConflictError, match="token is already in use"):
        state.create_account("acct-2", token="token-of-acct-1")
    with pytest.raises(SandboxError, match="must match"):
        state.create_account("has spaces")
    with pytest.raises(SandboxError, match="at least 8 characters"):
        state.create_account("acct-3", token="short")
    with pytest.raises(UnknownAccountError, match="unknown account 'acct-9'"):
        state.apply_random(1, account_ids=["acct-9"])
    with pytest.raises(UnknownAccountError):
        state.truth("acct-9")
    with pytest.raises(ValidationError, match="positive weight"):
        ChangeMix(create=0, update=0, delete=0)
    assert state.create_account().account_id == "acct-2"


@settings(max_examples=60, deadline=None)
@given(
    page_size=st.integers(min_value=1, max_value=7),
    steps=st.lists(st.tuples(st.booleans(), st.integers(min_value=0, max_value=6)), min_size=1, max_size=30),
    seed=st.integers(min_value=0, max_value=10_000),
)
def test_paging_never_misses_a_change_made_between_pages(
    page_size: int, steps: list[tuple[bool, int]], seed: int
) -> None:
    """Whatever changes between pages, paging to the end sees every object's final version."""
    state = SandboxState(seed=seed)
    state.create_account("acct-1", contacts=10)
    seen: dict[str, dict[str, object]] = {}
    after = None
    for read_first, changes in steps + [(True, 0)] * 50:
        if changes and not read_first:
            state.apply_random(changes, mix=ChangeMix(deal_share=0))
        page = state.page("acct-1", "contacts", limit=page_size, after=after)
        seen.update({item["id"]: item for item in page.items})
        if page.items:
            after = (page.items[-1]["updated_at"], page.items[-1]["id"])
        if changes and read_first:
            state.apply_random(changes, mix=ChangeMix(deal_share=0))
    final = {c["id"]: c for c in state.truth("acct-1")["contacts"]}
    assert {i: seen[i] for i in final} == final


def test_updated_after_is_exclusive() -> None:
    state = SandboxState()
    state.create_account("acct-1", contacts=3)
    first, second, third = state.truth("acct-1")["contacts"]
    page = state.page("acct-1", "contacts", limit=10, updated_after=parse_timestamp(first["updated_at"]))
    assert [c["id"] for c in page.items] == [second["id"], third["id"]]
    assert page.resume_after is None


def test_rate_limiter_allows_a_burst_then_says_when_to_retry() -> None:
    now = [100.0]
    limiter = RateLimiter(RateLimitSettings(rate_per_s=0.5, burst=2), monotonic=lambda: now[0])
    assert limiter.acquire("a") is None
    assert limiter.acquire("a") is None
    assert limiter.acquire("a") == 2  # one token takes 2 s at 0.5/s
    assert limiter.acquire("b") is None  # buckets are per token
    now[0] += 1.0
    assert limiter.acquire("a") == 1
    now[0] += 1.0
    assert limiter.acquire("a") is None
    limiter.configure(RateLimitSettings(enabled=False))
    assert all(limiter.acquire("a") is None for _ in range(100))


def test_chaos_is_off_by_default_and_seeded() -> None:
    assert Chaos().fate().holds_s == (0.0,)
    knobs = ChaosSettings(drop_pct=30, duplicate_pct=30, delay_s=2.0)
    fates = _fates(knobs, 3, 200)
    assert fates == _fates(knobs, 3, 200)
    assert fates != _fates(knobs, 4, 200)
    assert 0 < sum(f.dropped for f in fates) < 200
    assert 0 < sum(f.duplicated for f in fates) < 200
    assert all(0 <= hold <= 2.0 for f in fates for hold in f.holds_s)
    assert all(f.dropped for f in _fates(ChaosSettings(drop_pct=100), 1, 20))
    assert all(f.duplicated for f in _fates(ChaosSettings(duplicate_pct=100), 1, 20))
    with pytest.raises(ValidationError):
        ChaosSettings(drop_pct=101)


def _fates(knobs: ChaosSettings, seed: int, count: int) -> list[Fate]:
    chaos = Chaos(knobs, seed=seed)
    return [chaos.fate() for _ in range(count)]
