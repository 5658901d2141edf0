"""Acceptance 2: schemathesis fuzzes the live local and P2P APIs of a real node process.

The schema is the application's own (`create_app(...).openapi()`, what token holders get at
/api/v1/openapi.json); requests go to an `entraide serve` process, with a token holding every
role, so every operation is reached past its policy. Each answer must be no 5xx, a documented
status, the documented content type and headers, and a body matching the documented schema.

Budget: `MAX_EXAMPLES` per operation (about 25 operations, well under a minute). Left out:
`POST /api/v1/admin/peers`, which fetches whatever URL it is given — a fuzzer would aim it at
hosts outside this machine; tests/security/test_hostile_input.py covers it by hand.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from app.config import Settings
from app.localnodes import LocalNode
from app.main import create_app
from tests.security.conftest import ALL_ROLES, new_node, prepare

MAX_EXAMPLES = 15
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]

schema = schemathesis.openapi.from_dict(create_app(Settings()).openapi()).exclude(
    method="POST", path="/api/v1/admin/peers"
)


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalNode, str]]:
    base = tmp_path_factory.mktemp("fuzz")
    node, peer = new_node(base, "ES/MJ"), new_node(base, "AR/MPF")
    try:
        prepare([node, peer], clients=("admin",))
        node.pin(peer)  # so that some generated requests and ids reach real rows
        token = node.create_client("fuzzer", *ALL_ROLES)
        yield node, token
    finally:
        node.stop()
        peer.stop()


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
)
def test_live_api_matches_its_schema(
    case: schemathesis.Case, fuzzed: tuple[LocalNode, str]
) -> None:
    node, token = fuzzed
    case.call_and_validate(
        base_url=node.url,
        headers={"authorization": f"Bearer {token}"},
        checks=CHECKS,
        timeout=30,
    )
