"""The running node's resources, built once by the app's lifespan or a CLI command."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from app.audit.mac import append_with
from app.config import Settings
from app.crypto.keyfile import read_passphrase
from app.crypto.keys import NodeIdentity, NodeKeys, load_identity, load_keys
from app.db import make_engine, make_session_factory

if TYPE_CHECKING:
    from app.audit.anchor import SignedLogAnchor


@dataclass
class Node:
    settings: Settings
    identity: NodeIdentity
    keys: NodeKeys
    engine: Engine
    sessions: sessionmaker[Session]
    # Set when new outbound work is committed, so the in-process worker need not wait for
    # its next poll. Only a hint: the outbox table is the source of truth.
    outbox_signal: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        # Whatever appends through this node's sessions holds its log key: each entry gets its
        # MAC (app/audit/mac.py), in the server, `entraide worker` and every CLI command alike.
        append_with(self.sessions, self.keys.log)

    @property
    def authority_id(self) -> str:
        return self.identity.authority_id

    @property
    def log_anchor(self) -> SignedLogAnchor:
        """What this node's log key signed, outside the database (app/audit/anchor.py)."""
        from app.audit.anchor import SignedLogAnchor  # app.audit imports this module

        return SignedLogAnchor.of(self.settings)

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
    engine = make_engine(settings.database_url)
    return Node(
        settings=settings,
        identity=identity,
        keys=load_keys(settings.keys_dir, passphrase=key_passphrase(settings)),
        engine=engine,
        sessions=make_session_factory(engine),
    )
