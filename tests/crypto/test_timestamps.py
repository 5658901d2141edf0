"""Timestamps (docs/protocol.md section 2.4): one spelling per instant, written as read."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from app.crypto.encoding import DecodeError, format_time, parse_time


@pytest.mark.parametrize(
    ("moment", "text"),
    [
        (datetime(1, 1, 1, tzinfo=UTC), "0001-01-01T00:00:00Z"),
        (datetime(999, 12, 31, 23, 59, 59, tzinfo=UTC), "0999-12-31T23:59:59Z"),
        (datetime(2025, 3, 14, 9, 26, 53, 999_999, tzinfo=UTC), "2025-03-14T09:26:53Z"),
        (datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC), "9999-12-31T23:59:59Z"),
        # Another zone: the same instant in UTC.
        (
            datetime(2025, 3, 14, 6, 26, 53, tzinfo=timezone(timedelta(hours=-3))),
            "2025-03-14T09:26:53Z",
        ),
    ],
    ids=["year-1", "year-999", "fraction", "year-9999", "zone"],
)
def test_a_time_is_written_in_the_one_spelling_it_is_read_in(moment: datetime, text: str) -> None:
    """From review: year 1 was written `1-01-01T00:00:00Z` (glibc's %Y does not pad), which
    `parse_time` refuses, in the refusals that quote a peer's time of year 1."""
    assert format_time(moment) == text
    assert parse_time(text) == moment.replace(microsecond=0)


@pytest.mark.parametrize(
    "text",
    [
        "1-01-01T00:00:00Z",
        "0000-01-01T00:00:00Z",
        "2025-02-29T00:00:00Z",
        "2025-03-14T09:26:53+00:00",
    ],
)
def test_other_spellings_are_refused(text: str) -> None:
    with pytest.raises(DecodeError):
        parse_time(text)
