"""Orphan cleanup against a real database: only what no row names, and only when old."""

from __future__ import annotations

import hashlib
import os
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import delete, select
from sqlalchemy.orm import Session, sessionmaker

from app.config import Settings
from app.crypto.encoding import b64d, utc_now
from app.crypto.envelope import parse_header
from app.crypto.keyring import KeyRing
from app.crypto.keys import NodeIdentity, NodeKeys
from app.db import make_engine, unit_of_work
from app.evidence import cleanup
from app.evidence.blobstore import DirectoryBlobStore
from app.evidence.cleanup import OrphanSweep, cleanup_orphans
from app.evidence.inbound import held_parts, received_offset, transfer_header
from app.evidence.node_store import blob_store
from app.models import (
    Base,
    BlobPart,
    CaseFile,
    EvidenceDraft,
    EvidenceUpload,
    InboundTransfer,
    Message,
)
from app.node import Node
from tests.conftest import Databases, make_databases
from tests.crypto.test_envelope import seal

NOW = datetime(2026, 11, 28, tzinfo=UTC)


def _draft(draft_id: str, state: str) -> EvidenceDraft:
    return EvidenceDraft(
        id=draft_id,
        peer_authority="AR/MPF",
        created_by="officer",
        state=state,
        key_kid="0" * 32,
        key_wrap=b"w",
        sealed_content=b"c",
        created_at=NOW,
        updated_at=NOW,
    )


def _blob(store: DirectoryBlobStore, data: bytes) -> str:
    digest = hashlib.sha256(data).hexdigest()
    with store.upload(f"tmp-{digest[:16]}") as upload:
        upload.write(data)
        store.finalise(upload, digest)
    return digest


def test_cleanup_keeps_what_rows_name(databases: Databases, tmp_path: Path) -> None:
    engine = make_engine(databases.new())
    Base.metadata.create_all(engine)
    store = DirectoryBlobStore(tmp_path / "blobs")
    kept, orphan = _blob(store, b"named by an upload row"), _blob(store, b"named by nothing")
    live, dead = "a" * 32, "b" * 32
    for name in (f"out-{live}-1", f"out-{dead}-1", f"in-{'c' * 32}-1"):
        with store.upload(name) as upload:
            upload.write(b"partial")
    old = time.time() - 100 * 3600
    for path in [*store.uploads.iterdir(), *store.blobs.glob("*/*/*")]:
        os.utime(path, (old, old))
    try:
        with Session(engine) as session:
            session.add_all([_draft(live, "open"), _draft(dead, "submitted")])
            session.flush()
            session.add(
                EvidenceUpload(
                    draft_id=dead, part_index=1, size=1, stream_header=b"h" * 24, digest=kept
                )
            )
            session.commit()
            assert cleanup_orphans(session, store, older_than_hours=72) == (2, 1)
        assert store.exists(kept)
        assert not store.exists(orphan)
        assert [path.name for path in store.uploads.iterdir()] == [f"out-{live}-1"]
    finally:
        Base.metadata.drop_all(engine)
        engine.dispose()


def test_the_sweep_runs_once_per_period(databases: Databases, tmp_path: Path) -> None:
    url = databases.new()
    engine = make_engine(url)
    Base.metadata.create_all(engine)
    settings = Settings(database_url=url, keys_dir=tmp_path / "keys", blob_dir=tmp_path / "blobs")
    identity = NodeIdentity("ES/MJ", "Ministerio de Justicia", "http://127.0.0.1:1")
    node = Node(
        settings=settings,
        identity=identity,
        keyring=KeyRing(
            settings.keys_dir, identity, NodeKeys.generate(), stamp=None, passphrase=lambda: None
        ),
        engine=engine,
        sessions=sessionmaker(engine),
    )
    store = blob_store(settings)
    now = [1000.0]
    sweep = OrphanSweep(node, every_seconds=3600, clock=lambda: now[0])
    old = time.time() - 100 * 3600

    def abandon(name: str) -> None:
        with store.upload(name) as upload:
            upload.write(b"partial")
        os.utime(store.uploads / name, (old, old))

    try:
        abandon(f"out-{'d' * 32}-1")
        assert sweep.run_due() == (1, 0)  # the first sweep runs at once
        abandon(f"out-{'e' * 32}-1")
        now[0] += 3599
        assert sweep.run_due() is None  # not yet due: the abandoned upload stays
        assert store.upload_exists(f"out-{'e' * 32}-1")
        now[0] += 1
        assert sweep.run_due() == (1, 0)
        assert not any(store.uploads.iterdir())
    finally:
        Base.metadata.drop_all(engine)
        engine.dispose()


def _transfer_under_way(
    parts_done: int, *, sent: datetime | None = None
) -> tuple[InboundTransfer, list[bytes]]:
    """An inbound transfer of two attachments (sealed now, for seven days, unless `sent`
    says when), as announced, and its parts' ciphertexts."""
    attachments = [b"first attachment", b"second attachment"]
    wire = seal(attachments=attachments, created_at=sent or utc_now()).to_wire()
    header = b64d(wire["header"])
    transfer = InboundTransfer(
        msg_id=parse_header(header, 3).msg_id,
        sender_authority="FR/MJ",
        envelope_hash=hashlib.sha256(header).hexdigest(),
        header=header,
        signature=b64d(wire["signature"]),
        manifest_part=b64d(wire["parts"][0]),
        parts_done=parts_done,
        created_at=NOW,
        updated_at=NOW,
    )
    return transfer, [b64d(part) for part in wire["parts"]]


def _sweep_old_files_with(
    databases: Databases, store: DirectoryBlobStore, transfer: InboundTransfer
) -> tuple[int, int, int]:
    """Every file of `store` 100 hours old, `transfer` stored, then one sweep with 72 hours'
    grace: (uploads removed, blobs removed, transfer rows left)."""
    old = time.time() - 100 * 3600
    for path in [*store.uploads.glob("*"), *store.blobs.glob("*/*/*")]:
        os.utime(path, (old, old))
    engine = make_engine(databases.new())
    Base.metadata.create_all(engine)
    try:
        with Session(engine) as session:
            session.add(transfer)
            session.commit()
            removed = cleanup_orphans(session, store, older_than_hours=72)
            session.commit()
            left = len(list(session.scalars(select(InboundTransfer.msg_id))))
            return (*removed, left)
    finally:
        Base.metadata.drop_all(engine)
        engine.dispose()


def test_parts_received_of_a_transfer_under_way_are_kept(
    databases: Databases, tmp_path: Path
) -> None:
    store = DirectoryBlobStore(tmp_path / "blobs")
    transfer, parts = _transfer_under_way(parts_done=1)
    received, orphan = _blob(store, parts[1]), _blob(store, b"named by nothing")
    assert received == transfer_header(transfer).parts[1].sha256
    # The last part is days late: a slow or broken link.
    assert _sweep_old_files_with(databases, store, transfer) == (0, 1, 1)
    assert store.exists(received)
    assert not store.exists(orphan)


def test_what_an_abandoned_transfer_received_goes(databases: Databases, tmp_path: Path) -> None:
    store = DirectoryBlobStore(tmp_path / "blobs")
    # Sealed 20 days ago for 7: its envelope expired 13 days ago, long past the grace period.
    transfer, parts = _transfer_under_way(parts_done=1, sent=utc_now() - timedelta(days=20))
    received = _blob(store, parts[1])
    staged = f"in-{transfer.msg_id}-2"
    with store.upload(staged) as upload:
        upload.write(b"partial")
    # What it received, its staging upload and its row go.
    assert _sweep_old_files_with(databases, store, transfer) == (1, 1, 0)
    assert not store.exists(received)
    assert not store.upload_exists(staged)


def test_a_received_part_whose_blob_is_gone_is_asked_for_again(tmp_path: Path) -> None:
    store = DirectoryBlobStore(tmp_path / "blobs")
    transfer, parts = _transfer_under_way(parts_done=2)
    header = transfer_header(transfer)
    digests = [_blob(store, part) for part in parts[1:]]
    assert held_parts(store, transfer, header) == 2
    store.delete(digests[0])  # removed by hand, or a restore from an older backup
    assert held_parts(store, transfer, header) == 0
    # Part 1 from its start, part 2 after it: never a receipt for bytes no longer held.
    offsets = [received_offset(store, transfer, header, index, 0) for index in (1, 2)]
    assert offsets == [0, 0]


def test_a_transfer_whose_header_cannot_be_read_keeps_every_blob(
    databases: Databases, tmp_path: Path
) -> None:
    store = DirectoryBlobStore(tmp_path / "blobs")
    transfer, parts = _transfer_under_way(parts_done=1)
    transfer.header = b"not a header"  # damaged, or written by a version that read it
    received, orphan = _blob(store, parts[1]), _blob(store, b"named by nothing")
    # Which blobs it received cannot be told: none goes, and the sweep goes on.
    assert _sweep_old_files_with(databases, store, transfer) == (0, 0, 1)
    assert store.exists(received)
    assert store.exists(orphan)


def test_a_transfer_completing_during_the_sweep_keeps_its_parts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL: the sweep read `blob_parts` before the completion committed and the
    transfers after it, found the parts named by neither, and deleted a receipted message's
    evidence (a part received days before, on a slow link). It reads one snapshot now."""
    databases = make_databases("postgresql", tmp_path)
    engine = make_engine(databases.new())
    Base.metadata.create_all(engine)
    sessions = sessionmaker(engine, expire_on_commit=False)
    store = DirectoryBlobStore(tmp_path / "blobs")
    try:
        transfer, parts = _transfer_under_way(parts_done=1)
        header = transfer_header(transfer)
        first = _blob(store, parts[1])
        old = time.time() - 100 * 3600  # received 100 hours ago; the envelope lives 7 days
        for path in store.blobs.glob("*/*/*"):
            os.utime(path, (old, old))
        _blob(store, parts[2])  # the last part, just in
        with unit_of_work(sessions) as session:
            session.add(transfer)

        def complete() -> None:
            """What `inbound.complete` commits: the message and its parts; no transfer."""
            now = utc_now()
            with unit_of_work(sessions) as session:
                session.add(
                    CaseFile(
                        id=transfer.msg_id,
                        direction="inbound",
                        peer_authority="FR/MJ",
                        status="received",
                        urgency="normal",
                        created_at=now,
                        updated_at=now,
                    )
                )
                session.flush()
                message = Message(
                    msg_id=transfer.msg_id,
                    request_id=transfer.msg_id,
                    direction="inbound",
                    sender_authority="FR/MJ",
                    recipient_authority="DE/BMJ",
                    created_at=now,
                    expires_at=now + timedelta(days=7),
                    received_at=now,
                    header=transfer.header,
                    signature=transfer.signature,
                    envelope_hash=transfer.envelope_hash,
                    size_bytes=1,
                )
                session.add(message)
                session.flush()
                session.add_all(
                    BlobPart(
                        message_id=message.id,
                        part_index=index,
                        digest=header.parts[index].sha256,
                        length=header.parts[index].length,
                    )
                    for index in (1, 2)
                )
                session.execute(
                    delete(InboundTransfer).where(InboundTransfer.msg_id == transfer.msg_id)
                )

        completed: list[bool] = []

        def now_after_completion() -> datetime:
            # Called after the sweep read blob_parts, before it reads the transfers.
            if not completed:
                completed.append(True)
                complete()
            return utc_now()

        monkeypatch.setattr(cleanup, "utc_now", now_after_completion)
        with unit_of_work(sessions) as session:
            assert cleanup_orphans(session, store, older_than_hours=72) == (0, 0)
        assert completed
        assert store.exists(first)
    finally:
        engine.dispose()
        databases.drop_all()


def test_files_gone_while_the_sweep_runs_are_skipped(tmp_path: Path) -> None:
    """Finalised, discarded, or swept by another process between the listing and the look:
    the sweep goes on (it stopped, and rolled back its deletions of abandoned transfers)."""
    store = DirectoryBlobStore(tmp_path)
    for name in ("out-aaaa-1", "out-bbbb-1", "out-cccc-1"):
        with store.upload(name) as upload:
            upload.write(b"partial")
    old = time.time() - 100 * 3600
    for path in store.uploads.iterdir():
        os.utime(path, (old, old))

    def taken_by_another_sweep(name: str) -> bool:
        for path in store.uploads.iterdir():
            if path.name != name:
                path.unlink()
        return False

    assert store.cleanup(
        is_referenced=lambda _digest: False,
        upload_is_live=taken_by_another_sweep,
        older_than_seconds=72 * 3600,
    ) == (1, 0)
