"""What the receiver checks in a verified delivery before a provider parses it or the inbox stores it.

Each check turns input that could only fail later, as a 500 the provider retries forever, into a
400 with a one-line reason:

- :func:`check_json_depth`: nesting beyond a limit, checked on the raw bytes before any parser
  recurses into it (Python's parser raises ``RecursionError`` at about a thousand levels, and every
  later ``json.dumps`` of the payload would too).
- :func:`check_storable`: strings no database column takes. Postgres refuses NUL in text and
  ``\\u0000`` in JSONB, and no driver encodes a lone surrogate (``"\\ud800"`` is valid JSON and
  decodes to one); both failed inside the group commit, taking the whole batch down with them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from typing import Any

from sync_project.core.provider import InboundEvent, MalformedWebhookError

#: Deeper than any provider's payload (GitHub's nest about 6 levels), far below the parser's limit.
DEFAULT_MAX_JSON_DEPTH = 64
#: The deepest limit that can be configured: well under the ~1000 frames Python's parser allows.
MAX_JSON_DEPTH_LIMIT = 500
#: The inbox's column sizes (``store/schema.py``): longer values would fail the insert.
MAX_KEY_CHARS = 255

# A JSON string, escapes included; brackets inside one do not nest.
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_OPENING = frozenset(b"[{")
# A \u0000 escape in JSON text: preceded by an even number of backslashes (themselves escapes).
_NUL_ESCAPE = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")


class UnstorableEventError(MalformedWebhookError):
    """A verified event holds a value the inbox cannot store (HTTP 400)."""


def check_json_depth(body: bytes, max_depth: int) -> None:
    """Raise :class:`MalformedWebhookError` if ``body`` nests arrays/objects deeper than ``max_depth``.

    A byte scan, not a parse: strings are blanked out, then brackets are counted. Most bodies have
    fewer brackets in all than the limit and skip the scan.
    """
    if body.count(b"[") + body.count(b"{") <= max_depth:
        return
    depth = 0
    for byte in _STRING.sub(b"", body).translate(None, _NOT_BRACKETS):
        if byte in _OPENING:
            depth += 1
            if depth > max_depth:
                raise MalformedWebhookError(f"JSON nested deeper than {max_depth} levels")
        else:
            depth -= 1


def check_storable(events: Sequence[InboundEvent]) -> list[str]:
    """Raise :class:`UnstorableEventError` for the first event the inbox could not store.

    Returns each event's payload as the JSON text the inbox stores: the check serialises it
    anyway, and the commit thread would otherwise encode it again.
    """
    texts: list[str] = []
    for event in events:
        key = event.event_key
        if not isinstance(key, str | int) or isinstance(key, bool) or key == "":
            raise UnstorableEventError("event key is missing or not text")
        if isinstance(key, str):
            _check_text(key, "event key")
        where = f"event {str(key)[:80]!r}"
        if not isinstance(event.event_type, str):
            raise UnstorableEventError(f"{where}: event type is not text")
        _check_text(event.event_type, f"{where}: event type")
        if isinstance(event.account_id, str):
            _check_text(event.account_id, f"{where}: account id")
        elif event.account_id is not None and (
            not isinstance(event.account_id, int) or isinstance(event.account_id, bool)
        ):
            raise UnstorableEventError(f"{where}: account id is a {type(event.account_id).__name__}")
        texts.append(_check_payload(event.payload, where))
    return texts


def _check_text(value: str, what: str) -> None:
    if len(value) > MAX_KEY_CHARS:
        raise UnstorableEventError(f"{what} is longer than {MAX_KEY_CHARS} characters")
    problem = _text_problem(value)
    if problem:
        raise UnstorableEventError(f"{what} {problem}")


def _text_problem(value: str) -> str | None:
    if "\x00" in value:
        return "contains a NUL character"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "contains a lone UTF-16 surrogate (not encodable as UTF-8)"
    return None


#: The inbox's payload text: compact, UTF-8 (not escaped), NaN and Infinity refused. One encoder for
#: every payload: ``json.dumps`` with options builds a new one per call.
_PAYLOAD_JSON = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def _check_payload(payload: Any, where: str) -> str:
    if not isinstance(payload, dict):
        raise UnstorableEventError(f"{where}: payload is not a JSON object")
    # One C-speed serialisation says whether anything is wrong; only then is the payload walked
    # to name the place (a literal backslash-u0000 in a string is not a NUL, hence the regex).
    try:
        text = _PAYLOAD_JSON.encode(payload)
    except (TypeError, ValueError, RecursionError) as error:
        raise UnstorableEventError(f"{where}: payload is not storable JSON ({type(error).__name__})") from None
    # The substring first: the regex's look-behind at every position cost more than the dumps.
    suspicious = "\\u0000" in text and _NUL_ESCAPE.search(text) is not None
    if not suspicious:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            suspicious = True
    if not suspicious:
        return text
    for path, value in _strings(payload, "payload"):
        problem = _text_problem(value)
        if problem:
            raise UnstorableEventError(f"{where}: {path[:200]} {problem}")
    return text  # a literal backslash-u0000 (an escaped backslash): stored as it is


def _strings(value: Any, path: str) -> Iterator[tuple[str, str]]:
    """Every string in a JSON value (object keys too), with its path; iterative, so depth is free."""
    stack: list[tuple[str, Any]] = [(path, value)]
    while stack:
        here, item = stack.pop()
        if isinstance(item, str):
            yield here, item
        elif isinstance(item, dict):
            for key, child in item.items():
                if isinstance(key, str):
                    yield f"{here} (a key)", key
                stack.append((f"{here}{_segment(key)}", child))
        elif isinstance(item, list):
            stack.extend((f"{here}[{index}]", child) for index, child in enumerate(item))


def _segment(key: object) -> str:
    # The path goes into the answer and the log: keys are quoted unless plainly printable ASCII.
    if isinstance(key, str) and key.isascii() and key.isprintable() and len(key) <= 40 and "'" not in key:
        return f".{key}"
    return f"[{ascii(str(key)[:40])}]"
