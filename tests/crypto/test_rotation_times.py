"""Which rotation dates a follower takes (app/crypto/rotation.py `check_path_times`)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from nacl.public import PrivateKey
from nacl.signing import SigningKey

from app.crypto.rotation import Rotation, RotationError, check_path_times, make_rotation

NOW = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
SKEW = timedelta(minutes=5)
DAY = timedelta(days=1)


def _chain(*dates: datetime) -> list[Rotation]:
    signing, encryption = SigningKey.generate(), PrivateKey.generate()
    chain = []
    for seq, rotated_at in enumerate(dates, start=1):
        new_signing, new_encryption = SigningKey.generate(), PrivateKey.generate()
        chain.append(
            make_rotation(
                authority_id="DE/BFJ",
                seq=seq,
                old_signing=signing,
                old_encryption=encryption,
                new_signing=new_signing,
                new_encryption=new_encryption,
                rotated_at=rotated_at,
                accepted_until=rotated_at + 30 * DAY,
            )
        )
        signing, encryption = new_signing, new_encryption
    return chain


def test_links_dated_in_order_up_to_the_clock_and_skew_are_followed() -> None:
    since = NOW - 400 * DAY
    path = _chain(NOW - 300 * DAY, NOW - 10 * DAY, NOW + SKEW)
    check_path_times(path, now=NOW, skew=SKEW, since=since)
    # A clock corrected back by less than a day between two rotations, or since the
    # document pinned was issued: a correct node may do that.
    check_path_times(_chain(since - DAY + timedelta(seconds=1)), now=NOW, skew=SKEW, since=since)
    check_path_times(
        _chain(NOW - 2 * DAY, NOW - 3 * DAY + timedelta(seconds=1)), now=NOW, skew=SKEW
    )


def test_a_link_dated_after_the_clock_and_skew_is_refused() -> None:
    with pytest.raises(RotationError, match="rotation 2 is dated 2026-11-29T12:05:01Z, later"):
        check_path_times(_chain(NOW, NOW + SKEW + timedelta(seconds=1)), now=NOW, skew=SKEW)


def test_a_link_dated_more_than_a_day_before_what_it_follows_is_refused() -> None:
    with pytest.raises(
        RotationError,
        match=r"rotation 2 is dated 2026-11-26T12:00:00Z, more than a day before rotation 1 "
        r"\(2026-11-28T12:00:00Z\)",
    ):
        check_path_times(_chain(NOW - DAY, NOW - 3 * DAY), now=NOW, skew=SKEW)
    with pytest.raises(
        RotationError,
        match=r"rotation 1 is dated 2026-11-17T12:00:00Z, more than a day before the identity "
        r"document pinned with the keys it replaces was issued \(2026-11-19T12:00:00Z\)",
    ):
        check_path_times(_chain(NOW - 12 * DAY), now=NOW, skew=SKEW, since=NOW - 10 * DAY)
    # Without a date for the pinned document (none that this clock allows), the first link's
    # floor is the year 2000 (below).


def test_links_and_pins_of_year_1_are_judged_not_an_overflow() -> None:
    """From review: a day taken from year 1 is no date: a path whose link before is dated
    year 1, or followed from a document pinned as issued in year 1 (pinned before such dates
    were refused), raised OverflowError (a 500 at `peers add`, the refresh stopped) instead
    of being judged. Links dated before 2000 are now refused outright; a pin of year 1
    stays a floor that any real link clears."""
    first = datetime(1, 1, 1, tzinfo=UTC)
    check_path_times(_chain(NOW - DAY), now=NOW, skew=SKEW, since=first)
    for chain in (_chain(first), _chain(NOW - DAY, first)):
        with pytest.raises(RotationError, match=r"0001-01-01T00:00:00Z, earlier than any node"):
            check_path_times(chain, now=NOW, skew=SKEW, since=first)


def test_a_link_dated_before_2000_is_refused_even_without_a_pinned_date() -> None:
    """From an earlier note: identity documents had a floor of 2000, rotations none: a first
    link dated 1999 (or year 1) was followed when the pinned document gave no date."""
    with pytest.raises(
        RotationError,
        match=r"rotation 1 is dated 1999-12-31T23:59:59Z, earlier than any node made keys "
        r"\(2000-01-01T00:00:00Z\)",
    ):
        check_path_times(_chain(datetime(1999, 12, 31, 23, 59, 59, tzinfo=UTC)), now=NOW, skew=SKEW)
    check_path_times(_chain(datetime(2000, 1, 1, tzinfo=UTC)), now=NOW, skew=SKEW)
