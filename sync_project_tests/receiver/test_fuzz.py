"""A fuzz campaign against the receiver process on loopback, as an attacker or a broken provider
would run it: no 5xx for any generated request, no inbox row for any rejected delivery, no
traceback in the log, and resident memory that stays flat.

Bounded: a fixed number of examples (derandomized, so CI runs the same campaign every time, and
with no example database), each request with a 10 s timeout. Half of the deliveries are signed
correctly, so the campaign reaches parsing and storing, not only signature checks.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote_from_bytes

import httpx
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from sync_project.core import standard_webhooks
from sync_project.store import Store
from sync_project_tests.receiver.running import RECORDS_TOKEN, SANDBOX_SECRET, receiver_process

GITHUB_SECRET = "github-fuzz-secret"
DELIVERIES = 700
RECORDS_REQUESTS = 300
#: Resident memory may settle after warm-up; past it, the campaign must not grow it by more.
MAX_RSS_GROWTH_KIB = 24 * 1024
CAMPAIGN = settings(
    max_examples=DELIVERIES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# -- what is generated -------------------------------------------------------------------------------

#: Text with what real traffic and attackers send: NUL, lone surrogates, long runs, non-ASCII digits.
nasty_text = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["\x00", "a\x00b", "\ud800", "\udfff", "x" * 300, "١٢٣", "²", "", " ", "\u202e", "\\u0000"]),
)
numbers = st.one_of(
    st.integers(min_value=-(10**20), max_value=10**20),
    st.sampled_from([10**400, -(10**400), 2**63, 2**64]),
    st.floats(allow_nan=False, allow_infinity=False),
)
json_values = st.recursive(
    st.none() | st.booleans() | numbers | nasty_text,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(nasty_text, children, max_size=4),
    max_leaves=20,
)
timestamps = st.one_of(
    st.just("now"),
    st.just("now"),
    st.just("now"),
    st.sampled_from(["9" * 310, "9" * 5000, "-1", "+1700000000", "1_700_000_000", "١٧٠٠٠٠٠٠٠٠", "1e9", "", "0"]),
    st.integers(min_value=-(10**15), max_value=10**15).map(str),
)


def deep_json(depth: int) -> bytes:
    return b'{"id": "evt-deep", "type": "contact.updated", "data": ' + b"[" * depth + b"]" * depth + b"}"


@st.composite
def sandbox_envelopes(draw: st.DrawFn) -> dict[str, Any]:
    """A valid sandbox event with one or two of its fields replaced by anything: most requests
    then get as far as the store, where a bad value would have failed."""
    envelope: dict[str, Any] = {
        "id": "evt-ok",
        "type": draw(st.sampled_from(["contact.updated", "contact.deleted", "deal.updated", "invoice.paid"])),
        "account_id": "acct-1",
        "occurred_at": "2026-01-01T00:00:00Z",
        "data": draw(st.dictionaries(nasty_text, json_values, max_size=5)),
    }
    for key in draw(st.lists(st.sampled_from(sorted(envelope)), max_size=2, unique=True)):
        if draw(st.booleans()):
            envelope[key] = draw(st.one_of(nasty_text, json_values))
        else:
            envelope.pop(key)
    return envelope


envelopes = sandbox_envelopes().map(lambda envelope: json.dumps(envelope).encode())
bodies = st.one_of(
    envelopes,
    envelopes,
    envelopes,
    json_values.map(lambda value: json.dumps(value).encode()),
    st.binary(max_size=200),
    st.integers(min_value=60, max_value=3000).map(deep_json),
    st.just(b'{"id": "evt-1", "type": "contact.updated", "data": {"n": NaN}}'),
)


@dataclass(frozen=True)
class Delivery:
    """A generated request; signed when sent (``sign``), so an explicit example never goes stale."""

    provider: str
    body: bytes
    sign: bool = True
    event_id: str = "evt-1"
    #: Header values that replace the signed ones (for a signed delivery, only the timestamp).
    overrides: tuple[tuple[str, str], ...] = ()
    github_event: str = "issues"

    def headers(self) -> dict[str, bytes]:
        headers: dict[str, str] = {"content-type": "application/json"}
        if self.provider == "sandbox" and self.sign:
            headers.update(standard_webhooks.sign_headers(SANDBOX_SECRET, self.event_id, self.body))
        elif self.provider == "github":
            digest = hmac.new(GITHUB_SECRET.encode(), self.body, hashlib.sha256).hexdigest()
            headers["x-hub-signature-256"] = f"sha256={digest}" if self.sign else "sha256=0"
            headers["x-github-delivery"] = self.event_id
            headers["x-github-event"] = self.github_event
        headers.update(self.overrides)
        # Sent as raw UTF-8 bytes; control characters cannot be sent in a header at all (HTTP/1.1).
        # (nor leading or trailing blanks, which a parser strips).
        return {
            k: bytes(b for b in v.encode("utf-8", "surrogatepass") if b >= 32 and b != 127).strip(b" \t")
            for k, v in headers.items()
        }


@st.composite
def deliveries(draw: st.DrawFn) -> Delivery:
    provider = draw(st.sampled_from(["sandbox", "sandbox", "sandbox", "github", "hubspot", "stripe", "nope"]))
    body = draw(bodies)
    # Ids travel in a header: printable ASCII (of any length) is what one can carry and sign.
    event_id = draw(
        st.one_of(
            st.integers(min_value=0, max_value=10**9).map(lambda n: f"evt-{n}"),
            st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), max_size=300),
        )
    )
    sign = draw(st.sampled_from([True, True, True, False]))
    overrides: dict[str, str] = {}
    if provider == "sandbox":
        stamp = draw(timestamps)
        if stamp != "now":
            overrides[standard_webhooks.TIMESTAMP_HEADER] = stamp
        if not sign:
            overrides[standard_webhooks.ID_HEADER] = event_id
            overrides[standard_webhooks.TIMESTAMP_HEADER] = stamp if stamp != "now" else str(int(time.time()))
            overrides[standard_webhooks.SIGNATURE_HEADER] = draw(st.sampled_from(["v1,AAAA", "v1", "", "v2,x y"]))
    elif provider == "hubspot":
        overrides = {"x-hubspot-signature-v3": "AAAA", "x-hubspot-request-timestamp": draw(timestamps)}
    elif provider == "stripe":
        overrides = {"stripe-signature": f"t={draw(timestamps)},v1={'0' * 64}"}
    github_event = draw(st.sampled_from(["issues", "ping", "x" * 300]))
    return Delivery(provider, body, sign, event_id, tuple(overrides.items()), github_event)


def sandbox_body(**fields: Any) -> bytes:
    envelope = {
        "id": "evt-ok",
        "type": "contact.updated",
        "account_id": "acct-1",
        "occurred_at": "2026-01-01T00:00:00Z",
        "data": {"id": "con_1"},
    }
    envelope.update(fields)
    return json.dumps(envelope).encode()


#: What the issue's campaign found, always tried: each answered 500 before this branch.
FOUND = [
    Delivery("sandbox", sandbox_body(), overrides=((standard_webhooks.TIMESTAMP_HEADER, "9" * 310),)),
    Delivery("sandbox", sandbox_body(account_id="acct\x00-1"), event_id="evt-nul-account"),
    Delivery("sandbox", sandbox_body(data={"id": "con_1", "name": "\ud800"}), event_id="evt-surrogate"),
    Delivery("sandbox", sandbox_body(data={"id": "con_1", "a\x00": 1}), event_id="evt-nul-key"),
    Delivery("github", deep_json(5000), event_id="evt-deep"),
    Delivery("stripe", b"{}", overrides=(("stripe-signature", f"t={'9' * 310},v1={'0' * 64}"),)),
]


record_parameter_values = st.one_of(
    nasty_text,
    st.sampled_from(
        [
            "north",
            "0001-01-01T00:00:00+14:00",
            "9999-12-31T23:59:59-14:00",
            "10001",
            "0",
            "9" * 400,
            "added,updated",
            ",",
            "2026-01-01T00:00:00Z",
        ]
    ),
    json_values.map(lambda value: base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")),
    st.just(base64.urlsafe_b64encode(b"[" * 700 + b"]" * 700).decode()),
)


@st.composite
def record_queries(draw: st.DrawFn) -> tuple[str, list[tuple[str, str]]]:
    path = draw(
        st.sampled_from(
            ["/records/sandbox/contacts", "/records/sandbox/deals", "/records/github/issues", "/records/nope/x"]
        )
    )
    names = st.sampled_from(["connection", "cursor", "limit", "filter", "modified_after", "other"])
    params = draw(st.lists(st.tuples(names, record_parameter_values), max_size=5))
    if draw(st.booleans()):
        params.insert(0, ("connection", "north"))
    return path, params


# -- the campaigns ------------------------------------------------------------------------------


def test_no_generated_delivery_gets_a_5xx_or_stores_anything_when_refused(database_url: str, tmp_path: Path) -> None:
    with Store(database_url) as store:
        store.connections.add("sandbox", "north", account_id="acct-1")
        with (
            receiver_process(
                database_url,
                tmp_path,
                "--max-body-bytes",
                "65536",
                env={
                    "SYNC_GITHUB_WEBHOOK_SECRET": GITHUB_SECRET,
                    "SYNC_HUBSPOT_CLIENT_SECRET": "hubspot-fuzz-secret",
                    "SYNC_STRIPE_WEBHOOK_SECRET": "whsec_stripefuzz",
                },
            ) as receiver,
            httpx.Client(timeout=10) as client,
        ):
            rss: list[int] = []
            answered: dict[int, int] = {}

            def campaign(delivery: Delivery) -> None:
                before = store.inbox.count()
                headers, body = delivery.headers(), delivery.body
                response = client.post(f"{receiver.url}/webhooks/{delivery.provider}", content=body, headers=headers)
                answered[response.status_code] = answered.get(response.status_code, 0) + 1
                assert response.status_code < 500, (response.status_code, response.text, body[:200], headers)
                if response.status_code >= 400:
                    assert store.inbox.count() == before, "a refused delivery stored a row"
                    assert "\n" not in response.json()["error"]
                rss.append(receiver.rss_kib())

            generated = given(delivery=deliveries())(campaign)
            for found in FOUND:
                generated = example(delivery=found)(generated)
            CAMPAIGN(generated)()
            lines = receiver.log_lines()
        assert sum(answered.values()) >= DELIVERIES * 0.9
        # The campaign reached every stage: refused unsigned, refused malformed, and stored.
        assert {202, 400, 401, 404} <= set(answered), answered
        settled = rss[len(rss) // 5]
        print(f"rss KiB: first {rss[0]}, settled {settled}, max after {max(rss[len(rss) // 5 :])}, answers {answered}")
        assert max(rss[len(rss) // 5 :]) - settled < MAX_RSS_GROWTH_KIB, (settled, max(rss))
        assert not [line for line in lines if "exception" in line or "Traceback" in str(line.get("message", ""))]


def test_no_generated_records_query_gets_a_5xx(database_url: str, tmp_path: Path) -> None:
    with Store(database_url) as store:
        store.connections.add("sandbox", "north", account_id="acct-1")
    with (
        receiver_process(database_url, tmp_path) as receiver,
        httpx.Client(timeout=10, headers={"authorization": f"Bearer {RECORDS_TOKEN}"}) as client,
    ):
        answered: dict[int, int] = {}
        started = time.monotonic()

        @settings(CAMPAIGN, max_examples=RECORDS_REQUESTS)
        @given(query=record_queries())
        def campaign(query: tuple[str, list[tuple[str, str]]]) -> None:
            path, params = query
            # Percent-encoded as raw bytes: a lone surrogate arrives as the invalid UTF-8 it is.
            encoded = "&".join(
                f"{quote_from_bytes(name.encode())}={quote_from_bytes(value.encode('utf-8', 'surrogatepass'))}"
                for name, value in params
            )
            response = client.get(f"{receiver.url}{path}?{encoded}")
            answered[response.status_code] = answered.get(response.status_code, 0) + 1
            assert response.status_code < 500, (response.status_code, response.text, params)

        campaign()
        lines = receiver.log_lines()
    assert {200, 400, 404} <= set(answered), answered
    assert time.monotonic() - started < 600
    assert not [line for line in lines if "exception" in line]
