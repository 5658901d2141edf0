"""The running node's resources, built once by the app's lifespan or a CLI command."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from app.audit.mac import append_with
from app.config import Settings
from app.crypto.keyfile import read_passphrase
from app.crypto.keyring import KeyRing
from app.crypto.keys import (
    NodeIdentity,
    NodeKeys,
    keys_folder_lock,
    load_identity,
    rotation_staged,
)
from app.db import make_engine, make_session_factory, unit_of_work
from app.errors import EntraideError
from app.obs.storage import StorageFull

if TYPE_CHECKING:
    from app.audit.anchor import SignedLogAnchor

log = logging.getLogger(__name__)


@dataclass
class Node:
    settings: Settings
    identity: NodeIdentity
    keyring: KeyRing
    engine: Engine
    sessions: sessionmaker[Session]
    # Set when new outbound work is committed, so the in-process worker need not wait for
    # its next poll. Only a hint: the outbox table is the source of truth.
    outbox_signal: threading.Event = field(default_factory=threading.Event)
    # When this process last found its storage full: noted by the HTTP handlers and the
    # in-process delivery worker alike, read by /readyz (from review: a full database met by
    # the worker alone left /readyz `storage: ok`).
    storage_full: StorageFull = field(default_factory=StorageFull)

    def __post_init__(self) -> None:
        # Whatever appends through this node's sessions holds its log key: each entry gets its
        # MAC (app/audit/mac.py), in the server, `entraide worker` and every CLI command alike.
        append_with(self.sessions, self.keys.log)

    @property
    def authority_id(self) -> str:
        return self.identity.authority_id

    @property
    def keys(self) -> NodeKeys:
        """The keys the keys folder holds now: a rotation made by `entraide keys rotate` in
        another process is followed without a restart (app/crypto/keyring.py). Read it once
        where a key and its id go together: a rotation may land between two reads."""
        return self.keyring.current().keys

    @property
    def identity_document(self) -> dict[str, str]:
        """The self-signed identity document publishing the current keys."""
        return self.keyring.current().document

    @cached_property
    def log_anchor(self) -> SignedLogAnchor:
        """What this node's log key signed, outside the database (app/audit/anchor.py). One
        for the node's life: it remembers which alarm it logged last (logged once, not at
        every worker round)."""
        from app.audit.anchor import SignedLogAnchor  # app.audit imports this module

        return SignedLogAnchor.of(self.settings)

    def record_rotations(self, *, after_seq: int) -> None:
        """Put on record the rotations of the keys in use past `after_seq` that no entry
        names yet (app/audit/rotations.py): a rotation this process made take effect."""
        from app.audit.rotations import record_rotations  # app.audit imports this module

        keys = self.keyring.state().generation.keys
        try:
            with keys_folder_lock(self.settings.keys_dir), unit_of_work(self.sessions) as session:
                written = record_rotations(session, keys, after_seq=after_seq, actor="node")
        except (SQLAlchemyError, EntraideError) as exc:
            # The keys are in use all the same; the log says what the audit trail lacks.
            log.error(
                "the rotation of the keys to signing key %s took effect here but could not be "
                "recorded in the audit log (%s)",
                keys.signing_kid,
                type(exc).__name__,
            )
            return
        for seq in written:
            log.info("key rotation %d recorded in the audit log (it took effect here)", seq)

    def close(self) -> None:
        self.engine.dispose()


def key_passphrase(settings: Settings) -> bytes | None:
    """The key files' passphrase, if the operator configured one (never logged)."""
    value = settings.key_passphrase.get_secret_value() if settings.key_passphrase else None
    return read_passphrase(value, settings.key_passphrase_file)


def load_node(settings: Settings) -> Node:
    identity = load_identity(settings.keys_dir)
    if settings.authority_id and settings.authority_id != identity.authority_id:
        raise ValueError(
            f"ENTRAIDE_AUTHORITY_ID is {settings.authority_id} but the keys in "
            f"{settings.keys_dir} belong to {identity.authority_id}"
        )
    if settings.public_url and settings.public_url != identity.public_url:
        identity = NodeIdentity(identity.authority_id, identity.name, settings.public_url)
    # A rotation stopped half way is finished by the load below: on record then (its CLI
    # may have stopped before its own entry).
    stopped = rotation_staged(settings.keys_dir)
    # Read again at each reload, as a restart would: the file may have been updated since.
    keyring = KeyRing.load(settings.keys_dir, identity, passphrase=lambda: key_passphrase(settings))
    engine = make_engine(settings.database_url)
    node = Node(
        settings=settings,
        identity=identity,
        keyring=keyring,
        engine=engine,
        sessions=make_session_factory(engine),
    )
    keyring.on_rotation = lambda before, _keys: node.record_rotations(
        after_seq=len(before.rotations)
    )
    rotations = len(keyring.state().generation.keys.rotations)
    if stopped and rotations:
        node.record_rotations(after_seq=rotations - 1)
    return node
