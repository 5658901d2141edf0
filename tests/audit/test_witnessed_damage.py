"""A witnessed checkpoint row holding a value that cannot be read, or that is not its note's.

From review: on SQLite, which keeps any value in any column, a `witnessed_checkpoints` row
whose `size` was made text sorted above every number and became the peer's "largest known"
checkpoint: witnessing of that peer then failed at every round (a TypeError, or the column
the driver could not read), silently for the operator, and doctor said nothing. A root made
text raised split-view alarms against an honest peer; a date stopped every round that read
the row. Worse, a size lowered below the others (PostgreSQL's bigint holds -1 as well as
SQLite does) passed the row over, and a history the peer forked since the checkpoint it
recorded was checked against an older one and cosigned. The witnessed row is the anchor of
the check: while one the check reads is damaged, witnessing of its peer is held (nothing
checked, cosigned or alarmed), said once (`witness.held`), and named by doctor; it resumes
once the row is put back or set aside by an operator. SQLite and PostgreSQL; the running
nodes: tests/audit/test_witnessed_damage_nodes.py.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from sqlalchemy import Engine, select, text
from sqlalchemy.orm import Session, sessionmaker

from app.audit.checkpoints import log_origin
from app.audit.mac import append_with
from app.audit.merkle import leaf_hash
from app.audit.note import Checkpoint, sign_note
from app.audit.witness import witness_receipt_checkpoint
from app.audit.witnessed import MAX_SIZE
from app.crypto.keys import NodeKeys
from app.db import make_engine, make_session_factory, unit_of_work
from app.migrate import upgrade
from app.models import AuditEntry, WitnessAlarm, WitnessedCheckpoint
from tests.audit.test_witness import COMMON, PEER, SHOWN_TO_A, SHOWN_TO_B, _note, _peer
from tests.audit.test_witness import _peer_answering as _answering
from tests.conftest import Databases

# The peer's log as it really grew, and a history it forked after size 10 (its checkpoint
# of size 20 is in neither's past but the first's).
HONEST = SHOWN_TO_A + [leaf_hash(f"entry {n}".encode()) for n in range(20, 22)]
FORKED = SHOWN_TO_B + [leaf_hash(f"rewritten {n}".encode()) for n in range(20, 22)]

# What each backend can hold in a witnessed row's column that is not what the peer showed.
DAMAGE = {
    "sqlite": [
        ("size", "'abc'"),
        ("size", "CAST(X'FF00FE' AS TEXT)"),  # text that is not UTF-8, a NUL inside
        ("size", "X'FF00FE'"),
        ("size", "8.5"),
        ("size", "-1"),  # below every other: the row was passed over
        ("size", "size - 1"),  # a size, but not its note's
        ("root_hash", "'abc'"),
        ("root_hash", "X'00'"),
        ("note", "CAST(X'FF00FE' AS TEXT)"),
        ("note", "'not a note'"),
    ],
    "postgresql": [
        ("size", "-1"),
        ("size", "9223372036854775807"),
        ("size", "size - 1"),
        ("root_hash", "'\\x00'::bytea"),
        ("note", "'not a note'"),
    ],
}
# A date each backend keeps and its driver cannot give back.
NO_DATE = {"sqlite": "'abc'", "postgresql": "'infinity'"}
QUOTED = ("abc", "ff00fe", "\\xff", "\ufffd", "8.5", "not a note", "9223372036854775807")


@dataclass(frozen=True)
class Witness:
    """Our node's database, the peer pinned, and the peer's keys and ours."""

    url: str
    backend: str
    engine: Engine
    sessions: sessionmaker[Session]
    peer_keys: NodeKeys
    own_keys: NodeKeys

    def shown(self, leaves: list[bytes], log: list[bytes]) -> bool:
        """A receipt carries the peer's checkpoint of `leaves`; it proves from `log`."""
        return witness_receipt_checkpoint(
            self.sessions,
            _answering(log, lambda: None),
            authority=PEER,
            note=_note(self.peer_keys, leaves),
            own_authority="ES/MJ",
            log_key=self.own_keys.log,
        )

    def execute(self, statement: str) -> None:
        """Straight through the driver, which writes what SQLAlchemy would refuse."""
        if self.backend == "sqlite":
            with sqlite3.connect(self.url.removeprefix("sqlite:///")) as connection:
                connection.execute(statement)
            return
        with self.engine.begin() as connection:
            connection.execute(text(statement))

    def rows(self) -> list[int]:
        with self.engine.connect() as connection:
            return list(connection.scalars(select(WitnessedCheckpoint.id).order_by("id")))

    def alarms(self) -> list[str]:
        with self.engine.connect() as connection:
            return list(connection.scalars(select(WitnessAlarm.reason)))

    def entries(self, action: str) -> list[dict[str, object]]:
        with self.engine.connect() as connection:
            statement = select(AuditEntry.entry).where(AuditEntry.action == action)
            return [json.loads(entry) for entry in connection.scalars(statement)]


@pytest.fixture
def witness(databases: Databases) -> Iterator[Witness]:
    url = databases.new("witness")
    upgrade(url)
    engine = make_engine(url)
    own_keys = NodeKeys.generate()
    sessions = append_with(make_session_factory(engine), own_keys.log)
    peer_keys = NodeKeys.generate()
    with unit_of_work(sessions) as session:
        session.add(_peer(peer_keys))
    made = Witness(url, databases.backend, engine, sessions, peer_keys, own_keys)
    assert made.shown(COMMON, HONEST)  # row 1, size 10: the first needs no proof
    assert made.shown(SHOWN_TO_A, HONEST)  # row 2, size 20: the anchor
    yield made
    engine.dispose()


CASES = [(backend, *case) for backend, cases in DAMAGE.items() for case in cases]


@pytest.mark.parametrize(
    ("databases", "column", "value"),
    CASES,
    ids=[f"{backend}-{column}-{value}" for backend, column, value in CASES],
    indirect=["databases"],
)
def test_a_damaged_anchor_holds_witnessing_until_it_is_put_back(
    witness: Witness, column: str, value: str
) -> None:
    with witness.engine.connect() as connection:
        kept = connection.execute(
            text(f"SELECT {column} FROM witnessed_checkpoints WHERE id = 2")  # noqa: S608
        ).scalar_one()
    witness.execute(f"UPDATE witnessed_checkpoints SET {column} = {value} WHERE id = 2")  # noqa: S608

    # Neither the fork nor the honest log is checked against anything else meanwhile.
    for _ in range(2):
        assert not witness.shown(FORKED, FORKED)
        assert not witness.shown(HONEST, HONEST)
    assert witness.rows() == [1, 2]
    assert witness.alarms() == []  # nothing against the peer: the damage is ours
    (held,) = witness.entries("witness.held")  # said once, not at every receipt
    assert held["peer"] == PEER
    assert held["outcome"] == "stored_data_corrupt"
    assert held["details"] == {"rows": [2], "columns": [column]}, held
    from app.doctor import check_witnessed_rows

    named, holding = check_witnessed_rows(witness.engine)
    assert (named.level, holding.level, holding.area) == ("FAIL", "FAIL", f"peer {PEER}")
    assert named.message.startswith(f"the {column} of witnessed checkpoint row 2 "), named
    assert holding.message.startswith("its witnessing is held"), holding
    for said in (json.dumps(held["details"]), named.message):
        assert not any(quoted in said.lower() for quoted in QUOTED), said

    # Put back: resumed at the next receipt (one repeating that very checkpoint too), the
    # fork caught against it again, and the honest log witnessed.
    with witness.engine.begin() as connection:
        connection.execute(
            text(f"UPDATE witnessed_checkpoints SET {column} = :kept WHERE id = 2"),  # noqa: S608
            {"kept": kept},
        )
    assert witness.shown(SHOWN_TO_A, HONEST)
    assert len(witness.entries("witness.resumed")) == 1
    assert not witness.shown(FORKED, FORKED)
    assert witness.alarms() == ["no valid consistency proof from size 20 to 22"]
    assert witness.shown(HONEST, HONEST)
    assert witness.rows() == [1, 2, 3]
    assert len(witness.entries("witness.resumed")) == 1
    assert list(check_witnessed_rows(witness.engine)) == []


def test_an_anchor_set_aside_by_the_operator_ends_the_hold(witness: Witness) -> None:
    """No backup to put the row back from: the operator sets it aside (docs/operations.md
    §8), and witnessing goes on against the largest checkpoint left."""
    witness.execute("UPDATE witnessed_checkpoints SET size = -1 WHERE id = 2")
    assert not witness.shown(HONEST, HONEST)
    witness.execute(
        "UPDATE witnessed_checkpoints SET set_aside_at = CURRENT_TIMESTAMP WHERE id = 2"
    )
    assert witness.shown(HONEST, HONEST)  # proven against size 10
    assert witness.rows() == [1, 2, 3]
    assert witness.alarms() == []
    assert len(witness.entries("witness.resumed")) == 1
    from app.doctor import check_witnessed_rows

    (finding,) = check_witnessed_rows(witness.engine)  # named still, held no more
    assert "the size of witnessed checkpoint row 2 " in finding.message


def test_a_damaged_row_set_aside_and_shown_again_holds_until_deleted(witness: Witness) -> None:
    """Shown again, a row set aside is read to be taken up: damaged, it holds witnessing
    again, said no more than once, until deleted (docs/operations.md §8)."""
    witness.execute("UPDATE witnessed_checkpoints SET note = 'not a note' WHERE id = 2")
    witness.execute(
        "UPDATE witnessed_checkpoints SET set_aside_at = CURRENT_TIMESTAMP WHERE id = 2"
    )
    assert not witness.shown(SHOWN_TO_A, HONEST)
    assert not witness.shown(SHOWN_TO_A, HONEST)
    assert len(witness.entries("witness.held")) == 1
    witness.execute("DELETE FROM witnessed_checkpoints WHERE id = 2")
    assert witness.shown(SHOWN_TO_A, HONEST)  # witnessed afresh (SQLite reuses the id)
    assert len(witness.rows()) == 2
    assert (len(witness.entries("witness.held")), len(witness.entries("witness.resumed"))) == (1, 1)


def test_a_date_that_cannot_be_read_holds_nothing(witness: Witness) -> None:
    """No check reads a row's dates: the fork is caught, the honest log witnessed, and the
    date named by doctor (it failed every round that read the row)."""
    witness.execute(
        f"UPDATE witnessed_checkpoints SET received_at = {NO_DATE[witness.backend]} WHERE id = 2"  # noqa: S608
    )
    assert not witness.shown(FORKED, FORKED)
    assert witness.alarms() == ["no valid consistency proof from size 20 to 22"]
    assert witness.shown(HONEST, HONEST)
    assert witness.entries("witness.held") == []
    from app.doctor import check_witnessed_rows

    (finding,) = check_witnessed_rows(witness.engine)
    assert "the received_at of witnessed checkpoint row 2 " in finding.message
    assert "infinity" not in finding.message
    assert "abc" not in finding.message


def test_a_damaged_row_the_check_does_not_read_holds_nothing(witness: Witness) -> None:
    """Only the rows a check reads hold it (the largest, the newest, any whose size is no
    size of a log): an older one's damaged root is named by doctor, and left alone here."""
    root = {"sqlite": "X'00'", "postgresql": "'\\x00'::bytea"}[witness.backend]
    witness.execute(f"UPDATE witnessed_checkpoints SET root_hash = {root} WHERE id = 1")  # noqa: S608
    assert not witness.shown(FORKED, FORKED)
    assert witness.shown(HONEST, HONEST)
    assert witness.entries("witness.held") == []
    from app.doctor import check_witnessed_rows

    (finding,) = check_witnessed_rows(witness.engine)
    assert "the root_hash of witnessed checkpoint row 1 " in finding.message


def test_witnessed_rows_read_for_a_forked_history_are_never_passed_over(
    witness: Witness,
) -> None:
    """The anchor lowered below the rest (a size of -1, which both backends keep): read by
    the largest size alone, the row of size 10 became the anchor, and the forked history,
    proven consistent with it, was cosigned."""
    witness.execute("UPDATE witnessed_checkpoints SET size = -1 WHERE id = 2")
    assert not witness.shown(FORKED, FORKED)
    with witness.engine.connect() as connection:
        sizes = list(connection.scalars(select(WitnessedCheckpoint.size)))
    assert sorted(sizes) == [-1, 10]


@pytest.mark.parametrize("databases", ["sqlite", "postgresql"], indirect=True)
def test_a_size_past_what_is_stored_is_refused_not_stored_as_damage(witness: Witness) -> None:
    """From review: a peer's checkpoint claiming more than 2^62 entries (its note signed, its
    proof the peer's to make) was stored, then read back as damage of ours: the peer's
    witnessing was held for good, and a fork after it went unseen. It is refused and alarmed
    as a checkpoint that does not verify."""
    origin = log_origin(PEER)
    huge = Checkpoint(origin=origin, size=MAX_SIZE + 1, root_hash=bytes(32))
    note = sign_note(huge.format(), origin, witness.peer_keys.log)
    shown = witness_receipt_checkpoint(
        witness.sessions,
        _answering(HONEST, lambda: None),
        authority=PEER,
        note=note,
        own_authority="ES/MJ",
        log_key=witness.own_keys.log,
    )
    assert not shown
    assert witness.rows() == [1, 2]
    (alarm,) = witness.alarms()
    assert f"past the {MAX_SIZE}" in alarm
    assert witness.entries("witness.held") == []
    assert witness.shown(HONEST, HONEST)  # the honest log is witnessed again after it


@pytest.mark.parametrize("databases", ["sqlite", "postgresql"], indirect=True)
def test_an_anchor_whose_set_aside_date_cannot_be_read_holds_witnessing(
    witness: Witness,
) -> None:
    """A `set_aside_at` that is no date (SQLite keeps any value, PostgreSQL `infinity`) is
    not NULL: the anchor was taken for set aside and passed over, and the forked history,
    proven consistent with the row of size 10, was cosigned (from review)."""
    no_date = NO_DATE[witness.backend]
    witness.execute(f"UPDATE witnessed_checkpoints SET set_aside_at = {no_date} WHERE id = 2")  # noqa: S608
    assert not witness.shown(FORKED, FORKED)
    assert not witness.shown(HONEST, HONEST)
    assert witness.alarms() == []
    (held,) = witness.entries("witness.held")
    assert held["details"] == {"rows": [2], "columns": ["set_aside_at"]}, held
    from app.doctor import check_witnessed_rows

    findings = list(check_witnessed_rows(witness.engine))
    assert any(f.message.startswith("its witnessing is held") for f in findings), findings
    witness.execute("UPDATE witnessed_checkpoints SET set_aside_at = NULL WHERE id = 2")
    assert not witness.shown(FORKED, FORKED)
    assert witness.alarms() == ["no valid consistency proof from size 20 to 22"]
    assert witness.shown(HONEST, HONEST)
    assert len(witness.entries("witness.resumed")) == 1


@pytest.mark.parametrize("databases", ["sqlite", "postgresql"], indirect=True)
def test_the_newest_row_lowered_below_the_others_holds_witnessing(witness: Witness) -> None:
    """From review: the anchor, the peer's newest row, its size rewritten as a smaller size a
    log could have (below the next row's): PostgreSQL read no newest row, passed it over, took
    the row of size 10 for the anchor and cosigned the forked history, proven consistent with
    it. Now both backends read the newest: its size is not its note's, and witnessing is held.
    (When an older checkpoint was shown after it, the largest is no longer the newest, and is
    read by its size alone: docs/audit.md §7.)"""
    witness.execute("UPDATE witnessed_checkpoints SET size = 4 WHERE id = 2")

    assert not witness.shown(FORKED, FORKED)

    assert witness.alarms() == []
    (held,) = witness.entries("witness.held")
    assert held["details"] == {"rows": [2], "columns": ["size"]}, held
    assert witness.rows() == [1, 2]
