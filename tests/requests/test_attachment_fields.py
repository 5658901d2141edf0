"""Attachment names and media types at the local API (from a review): a media type in upper
case, as Python's `mimetypes` guesses some (`audio/AMR`), was refused though media types are
case-insensitive; names with a bidirectional override or a C1 control character, which show
another name than the file has, were taken and sent."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from tests.requests.conftest import EXAMPLE, Harness


def _request(attachments: list[dict[str, Any]]) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(json.dumps(EXAMPLE))
    body["to"] = "ES/MJ"
    body["document"].update(requesting_authority="AR/MPF", requested_authority="ES/MJ")
    body["attachments"] = attachments
    return body


def _inline(name: str, media_type: str = "application/octet-stream") -> dict[str, Any]:
    return {
        "name": name,
        "media_type": media_type,
        "content_base64": base64.b64encode(b"x").decode(),
    }


def test_a_media_type_in_upper_case_is_taken_in_lower_case(ar: Harness) -> None:
    given = [
        "application/vnd.ms-excel.sheet.macroEnabled.12",
        "audio/AMR",
        "Text/Plain; Charset=UTF-8",
    ]
    sent = ar.post("/api/v1/requests", _request([_inline(f"f{n}", t) for n, t in enumerate(given)]))
    assert sent.status_code == 201, sent.text
    read = ar.get(f"/api/v1/requests/{sent.json()['id']}")
    assert [item["media_type"] for item in read.json()["messages"][0]["attachments"]] == [
        "application/vnd.ms-excel.sheet.macroenabled.12",
        "audio/amr",
        "text/plain; charset=UTF-8",  # a parameter's value keeps its case
    ]
    declared = {"name": "call.amr", "media_type": "audio/AMR", "size": 1}
    draft = ar.post("/api/v1/evidence/drafts", {**_request([]), "attachments": [declared]})
    assert draft.status_code == 201, draft.text


@pytest.mark.parametrize(
    "name",
    ["invoice\u202etxt.exe", "a\u2066b", "a\u200fb", "a\u0085b", "a\u009bb", "a\u2028b", "a\x7fb"],
    ids=["RLO", "LRI", "RLM", "NEL", "CSI", "line separator", "DEL"],
)
def test_a_name_that_shows_another_name_is_refused(ar: Harness, name: str) -> None:
    for path, attachment in [
        ("/api/v1/requests", _inline(name)),
        ("/api/v1/evidence/drafts", {"name": name, "size": 1}),
    ]:
        refused = ar.post(path, _request([attachment]))
        assert refused.status_code == 422, refused.text
        (field,) = refused.json()["fields"]
        assert field["loc"] == ["body", "attachments", 0, "name"]
        assert field["type"] == "string_pattern_mismatch"
        assert name not in refused.text
        assert ar.audit("api.refused")[-1][1] == "invalid_request"
