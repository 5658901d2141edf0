"""Refusals are throttled per address, and an IPv6 host has a whole /64 to pick addresses
from: its refusals count against one key, or each new address would have its own `limit`
individually audited refusals (the audit log cannot be pruned)."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.auth.throttle import address_unit
from app.db import unit_of_work
from app.deps import record_p2p_refusal
from tests.conftest import Databases
from tests.requests.conftest import serve_node


@pytest.mark.parametrize(
    ("address", "unit"),
    [
        ("2001:db8:1:2::1", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff:ffff:ffff:fffe", "2001:db8:1:2::/64"),
        ("2001:DB8:1:2:0:0:0:7", "2001:db8:1:2::/64"),
        ("2001:db8:1:3::1", "2001:db8:1:3::/64"),  # the next /64: another host
        ("::ffff:192.0.2.7", "192.0.2.7"),  # an IPv4 client of a dual-stack socket
        ("192.0.2.7", "192.0.2.7"),
        ("192.0.2.8", "192.0.2.8"),  # IPv4 addresses one by one
        ("unknown", "unknown"),
    ],
)
def test_the_unit_of_an_address(address: str, unit: str) -> None:
    assert address_unit(address) == unit


def test_refusals_from_one_ipv6_64_share_one_limit(databases: Databases, tmp_path: Path) -> None:
    with serve_node(databases.new("ar", migrated=True), tmp_path) as ar:
        ar.node.settings.p2p_refusal_limit = 3  # this test's node only
        audited = []
        for host in range(1, 7):  # a new address for every refusal
            with unit_of_work(ar.node.sessions) as session:
                audited.append(record_p2p_refusal(session, ar.node, f"2001:db8:1:2::{host}"))
        with unit_of_work(ar.node.sessions) as session:
            elsewhere = record_p2p_refusal(session, ar.node, "2001:db8:1:3::1")
    assert audited == [True, True, True, False, False, False]
    assert elsewhere  # another /64 is not held to the first one's count
