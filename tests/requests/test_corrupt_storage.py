"""A stored envelope altered or damaged in the database is never shown as genuine: reading its
request or downloading its attachment answers 500 `stored_envelope_corrupt`, and the read it
stopped is in the audit log (the route's own transaction rolled back). Nothing is changed by
the refusal: once the bytes are put back, the request reads again."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from datetime import UTC, datetime

import pytest
from sqlalchemy import make_url, select, text, update

from app.db import unit_of_work
from app.models import Message, Part, Receipt
from tests.requests.conftest import Harness


def _flip_part(ar: Harness, msg_id: str, index: int) -> Callable[[], None]:
    """Flip one byte of a stored part; returns how to put it back."""
    with unit_of_work(ar.node.sessions) as session:
        part = session.scalar(
            select(Part)
            .join(Message, Message.id == Part.message_id)
            .where(Message.msg_id == msg_id, Part.part_index == index)
        )
        assert part is not None
        part_id, original = part.id, bytes(part.ciphertext)
        altered = bytearray(original)
        altered[len(altered) // 2] ^= 0x01
        part.ciphertext = bytes(altered)

    def restore() -> None:
        with unit_of_work(ar.node.sessions) as session:
            session.execute(update(Part).where(Part.id == part_id).values(ciphertext=original))

    return restore


def _flip_header(ar: Harness, msg_id: str) -> Callable[[], None]:
    with unit_of_work(ar.node.sessions) as session:
        message = session.scalar(select(Message).where(Message.msg_id == msg_id))
        assert message is not None
        original = bytes(message.header)
        message.header = original.replace(b'"routine"', b'"urgent"', 1) + b" "

    def restore() -> None:
        with unit_of_work(ar.node.sessions) as session:
            session.execute(update(Message).where(Message.msg_id == msg_id).values(header=original))

    return restore


@pytest.mark.parametrize("damage", ["part", "header"])
def test_a_damaged_stored_envelope_is_refused_and_audited(ar: Harness, damage: str) -> None:
    request_id = ar.receive_request()
    restore = _flip_part(ar, request_id, 0) if damage == "part" else _flip_header(ar, request_id)
    reads = len(ar.audit("request.read"))
    response = ar.http.get(f"/api/v1/requests/{request_id}", headers=ar.as_("officer"))
    assert response.status_code == 500
    assert response.json()["error"] == "stored_envelope_corrupt"
    assert request_id in response.json()["detail"]
    entries = ar.audit("request.read")[reads:]
    assert entries == [("client:officer", "stored_envelope_corrupt", request_id)]
    restore()
    again = ar.http.get(f"/api/v1/requests/{request_id}", headers=ar.as_("officer"))
    assert again.status_code == 200, again.text
    assert ar.audit("request.read")[-1] == ("client:officer", "ok", request_id)


def test_an_inline_attachment_of_a_damaged_envelope_is_refused_and_audited(ar: Harness) -> None:
    request_id = ar.receive_request()
    url = f"/api/v1/requests/{request_id}/messages/{request_id}/attachments/1"
    restore = _flip_part(ar, request_id, 1)
    downloads = len(ar.audit("attachment.downloaded"))
    response = ar.http.get(url, headers=ar.as_("officer"))
    assert response.status_code == 500
    assert response.json()["error"] == "stored_envelope_corrupt"
    entries = ar.audit("attachment.downloaded")[downloads:]
    assert entries == [("client:officer", "stored_envelope_corrupt", request_id)]
    restore()
    again = ar.http.get(url, headers=ar.as_("officer"))
    assert again.status_code == 200
    assert again.content == b"letter of request"


def test_a_stored_receipt_is_checked_again_before_it_is_shown(ar: Harness) -> None:
    """From an auditor's review: the receipt's time and signer were shown from their columns,
    unchecked; a backdated `received_at` or a zeroed signature read as the signed word."""
    request_id = ar.receive_request()
    url = f"/api/v1/requests/{request_id}"
    shown = ar.http.get(url, headers=ar.as_("officer")).json()["messages"][0]["receipt"]
    with unit_of_work(ar.node.sessions) as session:
        receipt = session.scalar(select(Receipt).join(Message).where(Message.msg_id == request_id))
        assert receipt is not None
        receipt.received_at = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    backdated = ar.http.get(url, headers=ar.as_("officer"))
    assert backdated.status_code == 200, backdated.text
    assert backdated.json()["messages"][0]["receipt"]["received_at"] == shown["received_at"]

    with unit_of_work(ar.node.sessions) as session:
        receipt = session.scalar(select(Receipt).join(Message).where(Message.msg_id == request_id))
        assert receipt is not None
        receipt_id, original = receipt.id, bytes(receipt.signature)
        receipt.signature = bytes(64)
    reads = len(ar.audit("request.read"))
    response = ar.http.get(url, headers=ar.as_("officer"))
    assert response.status_code == 500
    assert response.json()["error"] == "stored_envelope_corrupt"
    assert "stored receipt" in response.json()["detail"]
    assert ar.audit("request.read")[reads:] == [
        ("client:officer", "stored_envelope_corrupt", request_id)
    ]
    with unit_of_work(ar.node.sessions) as session:
        session.execute(update(Receipt).where(Receipt.id == receipt_id).values(signature=original))
    assert ar.http.get(url, headers=ar.as_("officer")).status_code == 200


@pytest.mark.parametrize("column", ["conversation", "created_at", "in_reply_to"])
def test_a_row_moved_or_backdated_is_not_shown_under_its_signature(
    ar: Harness, column: str
) -> None:
    """From a protocol review: the row's routing columns were shown as they stood, after only
    the header was checked. A message moved to another conversation, backdated or re-linked
    in the database read as verified there. Refused now, and nothing is changed by it."""
    first, moved = ar.receive_request(), ar.receive_request()
    changes: dict[str, object] = {
        "conversation": {"request_id": first},
        "created_at": {"created_at": datetime(2024, 1, 1, tzinfo=UTC)},
        "in_reply_to": {"in_reply_to": first},
    }[column]
    with unit_of_work(ar.node.sessions) as session:
        original = session.execute(
            select(Message.request_id, Message.created_at, Message.in_reply_to).where(
                Message.msg_id == moved
            )
        ).one()
        session.execute(update(Message).where(Message.msg_id == moved).values(**changes))
    shown_under = first if column == "conversation" else moved
    reads = len(ar.audit("request.read"))
    response = ar.http.get(f"/api/v1/requests/{shown_under}", headers=ar.as_("officer"))
    assert response.status_code == 500, response.text
    assert response.json()["error"] == "stored_envelope_corrupt"
    assert "differ from its signed header" in response.json()["detail"]
    assert ar.audit("request.read")[reads:] == [
        ("client:officer", "stored_envelope_corrupt", shown_under)
    ]
    with unit_of_work(ar.node.sessions) as session:
        session.execute(
            update(Message)
            .where(Message.msg_id == moved)
            .values(
                request_id=original.request_id,
                created_at=original.created_at,
                in_reply_to=original.in_reply_to,
            )
        )
    for request_id in (first, moved):
        again = ar.http.get(f"/api/v1/requests/{request_id}", headers=ar.as_("officer"))
        assert again.status_code == 200, again.text


def _text_signature(ar: Harness, msg_id: str) -> Callable[[], None]:
    """Store a message's signature (a BLOB) as TEXT that is not UTF-8, as a damaged page or a
    hand edit in `sqlite3` may: SQLite then refuses to read the row at all."""
    path = make_url(ar.node.settings.database_url).database
    assert path is not None
    with closing(sqlite3.connect(path)) as raw, raw:
        original = raw.execute("SELECT signature FROM messages WHERE msg_id = ?", (msg_id,))
        signature = original.fetchone()[0]
        raw.execute(
            "UPDATE messages SET signature = CAST(X'FFFE41' AS TEXT) WHERE msg_id = ?", (msg_id,)
        )

    def restore() -> None:
        with closing(sqlite3.connect(path)) as raw, raw:
            raw.execute("UPDATE messages SET signature = ? WHERE msg_id = ?", (signature, msg_id))

    return restore


def test_a_row_sqlite_cannot_decode_is_damage_not_an_unavailable_database(ar: Harness) -> None:
    """From review: a BLOB turned into TEXT that is not UTF-8 was answered `503
    database_unavailable` "retry later" (while /readyz said ready), as if the database could
    not be reached. It is damage, told and audited as the same damage as bytes is."""
    if not ar.node.settings.database_url.startswith("sqlite"):
        pytest.skip("PostgreSQL's bytea holds bytes only, and its text only valid UTF-8")
    request_id = ar.receive_request()
    restore = _text_signature(ar, request_id)
    try:
        reads = len(ar.audit("request.read"))
        response = ar.http.get(f"/api/v1/requests/{request_id}", headers=ar.as_("officer"))
        assert response.status_code == 500, response.text
        assert response.json()["error"] == "stored_envelope_corrupt"
        assert request_id in response.json()["detail"]
        assert "signature" in response.json()["detail"]
        assert ar.audit("request.read")[reads:] == [
            ("client:officer", "stored_envelope_corrupt", request_id)
        ]
        # Another read of the row: the same damage, named, never "retry later".
        proof = ar.http.get(
            f"/api/v1/requests/{request_id}/messages/{request_id}/proof",
            headers=ar.as_("officer"),
        )
        assert proof.status_code == 500, proof.text
        assert proof.json()["error"] in {"stored_envelope_corrupt", "stored_data_corrupt"}
        assert "signature" in proof.json()["detail"]
        assert ar.http.get("/readyz").status_code == 200
    finally:
        restore()
    again = ar.http.get(f"/api/v1/requests/{request_id}", headers=ar.as_("officer"))
    assert again.status_code == 200, again.text


@pytest.mark.parametrize(
    ("table", "column", "route"),
    [
        # The read of one request labels its columns (`requests_peer_authority`), the list
        # does not (`status`): both are named as the table's column.
        ("requests", "peer_authority", "/api/v1/requests/{id}"),
        ("requests", "status", "/api/v1/requests"),
        ("peers", "name", "/api/v1/admin/peers"),
    ],
)
def test_a_value_sqlite_cannot_decode_is_named_by_its_table_and_column(
    ar: Harness, table: str, column: str, route: str
) -> None:
    """From review: `stored_data_corrupt` named the query's label of the column on some
    routes (`requests_peer_authority`), its bare name on others, never its table."""
    if not ar.node.settings.database_url.startswith("sqlite"):
        pytest.skip("PostgreSQL's text holds only valid UTF-8")
    request_id = ar.receive_request()
    key, row = ("id", request_id) if table == "requests" else ("authority_id", "ES/MJ")
    path = make_url(ar.node.settings.database_url).database
    assert path is not None
    with closing(sqlite3.connect(path)) as raw, raw:
        select_ = f"SELECT {column} FROM {table} WHERE {key} = ?"  # noqa: S608
        (original,) = raw.execute(select_, (row,)).fetchone()
        raw.execute(
            f"UPDATE {table} SET {column} = CAST(X'C328FF' AS TEXT) WHERE {key} = ?",  # noqa: S608
            (row,),
        )
    try:
        client = "admin" if "/admin/" in route else "officer"
        response = ar.http.get(route.format(id=request_id), headers=ar.as_(client))
    finally:
        with closing(sqlite3.connect(path)) as raw, raw:
            raw.execute(f"UPDATE {table} SET {column} = ? WHERE {key} = ?", (original, row))  # noqa: S608
    assert response.status_code == 500, response.text
    assert response.json()["error"] == "stored_data_corrupt"
    assert (
        f"a value stored in column '{table}.{column}' cannot be read" in (response.json()["detail"])
    )


# A time each backend keeps but cannot give back: SQLite stores any text; PostgreSQL keeps
# 'infinity', which its driver cannot load into a Python datetime (psycopg's DataError).
NO_TIME = {"sqlite": "'not a time'", "postgresql": "'infinity'"}


@contextmanager
def _damaged(
    ar: Harness, table: str, column: str, key: str, row: str, value: str
) -> Iterator[None]:
    where = f"WHERE {key} = :row"
    with ar.node.engine.begin() as connection:
        (original,) = connection.execute(
            text(f"SELECT {column} FROM {table} {where}"),  # noqa: S608
            {"row": row},
        ).one()
        connection.execute(text(f"UPDATE {table} SET {column} = {value} {where}"), {"row": row})  # noqa: S608
    try:
        yield
    finally:
        with ar.node.engine.begin() as connection:
            connection.execute(
                text(f"UPDATE {table} SET {column} = :original {where}"),  # noqa: S608
                {"original": original, "row": row},
            )


@pytest.mark.parametrize(
    ("table", "column", "route"),
    [
        ("peers", "added_at", "/api/v1/admin/peers"),
        ("requests", "created_at", "/api/v1/requests/{id}"),
        ("requests", "updated_at", "/api/v1/requests"),
    ],
)
def test_a_stored_time_that_cannot_be_read_is_damage_not_the_callers_input(
    ar: Harness, table: str, column: str, route: str
) -> None:
    """From review: on PostgreSQL a time of 'infinity' read back answered `400 invalid_value`
    ("a value in the request cannot be stored"), blaming the caller, and on SQLite a time
    that is no time `500 internal_error`, a bug. Both are damaged storage, named as such."""
    request_id = ar.receive_request()
    key, row = ("id", request_id) if table == "requests" else ("authority_id", "ES/MJ")
    client = "admin" if "/admin/" in route else "officer"
    value = NO_TIME[ar.node.engine.dialect.name]
    with _damaged(ar, table, column, key, row, value):
        response = ar.http.get(route.format(id=request_id), headers=ar.as_(client))
    assert response.status_code == 500, response.text
    assert response.json()["error"] == "stored_data_corrupt", response.text
    detail = response.json()["detail"]
    assert f"a value stored in column '{table}.{column}' cannot be read" in detail
    assert "infinity" not in detail
    assert "not a time" not in detail
    again = ar.http.get(route.format(id=request_id), headers=ar.as_(client))
    assert again.status_code == 200, again.text


# What each backend lets a peer's row hold that it cannot give back.
PEER_DAMAGE = {
    "sqlite": ("name", "CAST(X'C328FF' AS TEXT)"),
    "postgresql": ("added_at", "'infinity'"),
}


def test_a_damaged_peer_row_met_reading_a_request_is_not_blamed_on_its_message(
    ar: Harness,
) -> None:
    """From review: reading a request whose peer's row was damaged answered
    `stored_envelope_corrupt`, "a stored message of ...: its column 'peers.name'", sending
    the operator to the message. The peer's row is what is damaged, and it is named."""
    request_id = ar.receive_request()
    column, value = PEER_DAMAGE[ar.node.engine.dialect.name]
    reads = len(ar.audit("request.read"))
    with _damaged(ar, "peers", column, "authority_id", "ES/MJ", value):
        response = ar.http.get(f"/api/v1/requests/{request_id}", headers=ar.as_("officer"))
    assert response.status_code == 500, response.text
    assert response.json()["error"] == "stored_data_corrupt", response.text
    assert f"column 'peers.{column}' cannot be read" in response.json()["detail"]
    assert "message" not in response.json()["detail"]
    assert ar.audit("request.read")[reads:] == [
        ("client:officer", "stored_data_corrupt", request_id)
    ]
    again = ar.http.get(f"/api/v1/requests/{request_id}", headers=ar.as_("officer"))
    assert again.status_code == 200, again.text


def test_a_value_of_the_call_the_database_refuses_is_still_the_callers_input(
    ar: Harness,
) -> None:
    """The other side of the above: a DataError met sending the caller's value (PostgreSQL
    takes no NUL in text) stays `400 invalid_value`, never damage."""
    if ar.node.engine.dialect.name != "postgresql":
        pytest.skip("SQLite stores and compares a NUL like any character")
    response = ar.http.post(
        "/api/v1/admin/peers/suspend",
        headers=ar.as_("admin"),
        json={"authority_id": "ES/MJ\u0000", "reason": "a review"},
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"] == "invalid_value"


# A date each backend keeps but cannot give back (PostgreSQL's 'infinity' again).
NO_DATE = {"sqlite": "'not a date'", "postgresql": "'infinity'"}


@pytest.mark.parametrize("route", ["/api/v1/requests/{id}", "/api/v1/requests"])
def test_a_stored_date_that_cannot_be_read_is_damage_not_a_bug(ar: Harness, route: str) -> None:
    """From review: a date column (a request's requested date) holding a date that is no
    date answered `500 internal_error` on SQLite, the parser's bare error, as times did."""
    request_id = ar.receive_request()
    value = NO_DATE[ar.node.engine.dialect.name]
    with _damaged(ar, "requests", "requested_date", "id", request_id, value):
        response = ar.http.get(route.format(id=request_id), headers=ar.as_("officer"))
    assert response.status_code == 500, response.text
    assert response.json()["error"] == "stored_data_corrupt", response.text
    detail = response.json()["detail"]
    assert "a value stored in column 'requests.requested_date' cannot be read" in detail
    assert "not a date" not in detail
    assert "infinity" not in detail
    again = ar.http.get(route.format(id=request_id), headers=ar.as_("officer"))
    assert again.status_code == 200, again.text
