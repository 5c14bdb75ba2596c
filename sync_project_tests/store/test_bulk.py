"""The COPY text stream: whatever sizes psycopg2 reads it in, it yields exactly the lines given."""

from __future__ import annotations

import pytest

from sync_project.store.bulk import CopyText

LINES = [f"key-{i}\tüñï 😀 {'x' * (i % 37)}\\N\n" for i in range(500)]


@pytest.mark.parametrize("size", [1, 7, 64, 8192, 65536, 10**7])
def test_reads_of_any_size_give_the_lines_in_order(size: int) -> None:
    stream = CopyText(LINES)
    chunks = []
    while chunk := stream.read(size):
        assert len(chunk) <= size
        chunks.append(chunk)
    assert "".join(chunks) == "".join(LINES)
    assert all(len(chunk) == size for chunk in chunks[:-1])  # only the last read comes up short
    assert stream.read(size) == ""


def test_reading_everything_at_once_after_a_partial_read() -> None:
    stream = CopyText(LINES)
    head = stream.read(100)
    assert head + stream.read() == "".join(LINES)
    assert stream.read() == ""


def test_no_lines_read_as_empty() -> None:
    assert CopyText([]).read(8192) == ""
