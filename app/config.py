"""Node settings, read from ENTRAIDE_* environment variables."""

from __future__ import annotations

import ipaddress
import json
import os
import types
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from app.requests.deadlines import (
    DEFAULT_LIMITS,
    DEFAULT_OVERRIDES,
    TimeLimits,
    check_override_key,
)

AUTHORITY_ID_PATTERN = r"^[A-Z]{2}/[A-Z0-9_-]{1,32}$"
ENV_PREFIX = "ENTRAIDE_"


def _structured(annotation: Any) -> bool:
    """Whether a field's environment variable holds JSON (a model, a mapping, a list)."""
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):
        return any(_structured(arg) for arg in get_args(annotation) if arg is not type(None))
    if origin in (dict, list, set, frozenset, tuple) or annotation in (dict, list, set, tuple):
        return True
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def environment_values(model: type[BaseModel], environ: dict[str, str]) -> dict[str, Any]:
    """The fields set by ENTRAIDE_<FIELD> variables (any case), as pydantic-settings reads
    them: structured fields are decoded from JSON, others are left as text for the field's
    own validation. Text that is not JSON is left as it is, so validation names the field."""
    wanted = {ENV_PREFIX.lower() + name: name for name in model.model_fields}
    values: dict[str, Any] = {}
    for key, text in environ.items():
        name = wanted.get(key.lower())
        if name is None:
            continue
        value: Any = text
        if _structured(model.model_fields[name].annotation):
            try:
                value = json.loads(text)
            except ValueError:
                pass
        values[name] = value
    return values


def trusted_proxy_hosts(trusted_proxies: str) -> list[str]:
    """ENTRAIDE_TRUSTED_PROXIES as uvicorn compares them, each IPv4 address or network with
    its IPv4-mapped IPv6 form too: a node listening on `::` sees a proxy at 127.0.0.1 as
    ::ffff:127.0.0.1, and believed nothing from it (from review)."""
    hosts: list[str] = []
    for entry in filter(None, trusted_proxies.split(",")):
        network = ipaddress.ip_network(entry, strict=False)
        hosts.append(entry)
        if isinstance(network, ipaddress.IPv4Network):
            hosts.append(f"::ffff:{network.network_address}/{96 + network.prefixlen}")
    return hosts


class Settings(BaseModel):
    """Read from ENTRAIDE_* environment variables; values given to the constructor win.

    A plain model rather than pydantic-settings' BaseSettings, whose import (sources for
    cloud secret stores, dotenv, TOML, YAML and a command line) costs every process about
    4 MiB for the one source used here.
    """

    model_config = ConfigDict(extra="ignore", validate_default=True)

    @model_validator(mode="before")
    @classmethod
    def _from_environment(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        return {**environment_values(cls, dict(os.environ)), **data}

    database_url: str = "sqlite:///./entraide.db"
    keys_dir: Path = Path("./keys")
    # What the log key signed (app/audit/anchor.py), kept outside the database so that a
    # database writer cannot roll the audit log back. Default: `log-signed.json` in the keys
    # folder. Set it to a writable place where the keys folder is mounted read-only.
    signed_log_file: Path | None = None
    authority_id: str | None = Field(default=None, pattern=AUTHORITY_ID_PATTERN)
    name: str | None = None
    public_url: str | None = None

    # Plain HTTP between nodes exposes routing metadata and invites downgrade; only tests
    # and the local demo may turn this on.
    allow_insecure_http: bool = False
    # Streamed parts' PUTs are taken unsigned from a peer never seen signing one (a release
    # from before part signatures, docs/operations.md §7) unless this is on: once every peer
    # runs a release that signs, nothing but the sender's signature is taken from the first.
    part_signatures_required: bool = False
    # The reverse proxies (addresses or networks, comma-separated) whose X-Forwarded-For and
    # X-Forwarded-Proto the node believes. None by default: any process that reached the
    # port from loopback could otherwise name the address that audit entries record and the
    # throttles count (from review: uvicorn trusts 127.0.0.1 unless told otherwise).
    trusted_proxies: str = ""
    # /metrics, and /readyz's delivery backlog, without a token. Off by default: they say
    # when envelopes arrive and requests are sent (the fact of a request is confidential) to
    # anyone reaching the listener peers reach; only for a node whose reverse proxy restricts
    # both (docs/operations.md section 6).
    metrics_public: bool = False

    # Hostile-input bounds, checked before any cryptographic work.
    max_body_bytes: int = 32 * 1024 * 1024
    max_envelope_parts: int = 64
    max_header_bytes: int = 64 * 1024
    max_attachment_bytes: int = 16 * 1024 * 1024
    # Request bodies held in memory at once, by this process (JSON bodies are read whole
    # before anything checks them): default 8 x max_body_bytes, at least max_body_bytes. One
    # source address (an IPv6 /64) may hold half of it, at least one body: by default four,
    # as many as a peer's delivery worker posts at once (worker_concurrency). More: 503.
    max_buffered_body_bytes: int | None = Field(default=None, ge=1)

    # Large evidence (app/evidence): sealed parts in a blob store outside the database,
    # uploaded and transferred in streams. The blob directory defaults to `blobs` next to
    # the keys directory.
    blob_dir: Path | None = None
    max_evidence_attachment_bytes: int = Field(default=64 * 1024**3, ge=0)
    max_evidence_request_bytes: int = Field(default=256 * 1024**3, ge=0)
    max_evidence_attachments: int = Field(default=32, ge=1, le=63)
    # What one peer may have under way at once (envelopes announced whose parts are still
    # arriving, and their declared bytes): a pinned peer cannot fill this node's disk with
    # transfers it never finishes. More waits (429) until some complete or expire.
    max_inbound_transfers_per_peer: int = Field(default=16, ge=1)
    max_inbound_bytes_per_peer: int = Field(default=512 * 1024**3, ge=0)
    # Unfinished uploads and unreferenced blobs older than this are removed by cleanup.
    evidence_orphan_hours: float = Field(default=72.0, gt=0)
    # Open drafts with no upload activity for this long are discarded, with their uploads.
    evidence_draft_days: float = Field(default=30.0, gt=0)
    # What one API client may have open at once (drafts, and the bytes their attachments
    # declare, which is what their uploads may stage on disk): one token cannot fill this
    # node's evidence storage with drafts it never submits. More: 409 until some are
    # submitted, discarded, or discarded as idle. As for a peer's transfers, one draft is
    # always taken, whatever its size (the per-request limit bounds it).
    max_open_drafts_per_client: int = Field(default=64, ge=1)
    max_open_draft_bytes_per_client: int = Field(default=512 * 1024**3, ge=0)

    # Envelope lifetime and tolerated clock skew between nodes. A lifetime over 30 days is
    # refused by every receiver (docs/protocol.md §9 step 23); a skew over an hour would let
    # this node sign receipts dated further from the truth than senders accept (a day,
    # app/crypto/receipts.py) and take rotations dated far ahead.
    envelope_ttl_seconds: int = Field(default=7 * 24 * 3600, ge=1, le=30 * 24 * 3600)
    clock_skew_seconds: int = Field(default=300, ge=0, le=3600)

    # Delivery.
    run_worker: bool = True
    worker_poll_seconds: float = 0.5
    # How often each delivery worker says it is alive (app/delivery/heartbeat.py); one
    # silent for three periods is taken for gone by /readyz, /metrics and doctor.
    worker_heartbeat_seconds: float = Field(default=10.0, gt=0, le=3600)
    peer_timeout_seconds: float = 30.0
    # How long a claimed delivery is a worker's alone. A post may last up to
    # `longest_exchange_seconds`; a worker renews the lease before a post that could
    # outlive it, so the default leaves room for the longest post without a renewal.
    lease_seconds: int = Field(default=300, ge=1)
    # Deliveries posted at once by one worker (one slow peer must not hold up the rest).
    worker_concurrency: int = Field(default=4, ge=1, le=64)

    # Key files: optional passphrase protection (Argon2id + secretbox), from the environment
    # or from a file readable only by the node's user.
    key_passphrase: SecretStr | None = None
    key_passphrase_file: Path | None = None

    # TLS (docs/operations.md): the node serves HTTPS when a certificate is configured.
    # tls_ca verifies peers' server certificates (default: the system's CAs); tls_client_ca
    # lists the CAs (or self-signed certificates) that issue peers' client certificates, and
    # with p2p_require_client_cert every P2P call must present a certificate pinned for a peer.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    tls_client_ca: Path | None = None
    tls_client_cert: Path | None = None
    tls_client_key: Path | None = None
    p2p_require_client_cert: bool = False

    # Refusals per source address (and per API client) before answering 429 for a while;
    # counted in the database, so every process of the node shares them.
    auth_failure_limit: int = Field(default=20, ge=1)
    auth_failure_window_seconds: int = Field(default=300, ge=1)
    auth_block_seconds: int = Field(default=300, ge=1)
    p2p_refusal_limit: int = Field(default=200, ge=1)
    # At most one identity-document fetch per peer in this many seconds (key rotation).
    peer_refresh_seconds: int = Field(default=60, ge=0)
    # All request headers together (names and values), checked before anything else.
    max_http_header_bytes: int = Field(default=8 * 1024, ge=1024)

    # Logs on stderr: one JSON object per line (for a log shipper), or plain text.
    log_format: Literal["json", "text"] = "json"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    # Audit log checkpoints: every N entries or T seconds, whichever comes first.
    audit_checkpoint_every: int = 1000
    audit_checkpoint_seconds: float = 60.0

    # Deadlines (docs/domain.md, "Deadlines"): days from a request's arrival to acknowledge,
    # decide and execute it, and overrides per request type or legal basis, e.g.
    # ENTRAIDE_TIME_LIMIT_OVERRIDES='{"legal_basis:EU_EIO": {"decide": 30, "execute": 120}}'
    # (a value given replaces the whole default table of overrides).
    time_limits: TimeLimits = DEFAULT_LIMITS
    time_limit_overrides: dict[str, TimeLimits] = Field(
        default_factory=lambda: dict(DEFAULT_OVERRIDES)
    )

    @field_validator("time_limit_overrides")
    @classmethod
    def _known_override_keys(cls, value: dict[str, TimeLimits]) -> dict[str, TimeLimits]:
        for key in value:
            check_override_key(key)
        return value

    @model_validator(mode="after")
    def _room_for_one_body(self) -> Settings:
        budget = self.max_buffered_body_bytes
        if budget is not None and budget < self.max_body_bytes:
            raise ValueError(
                f"max_buffered_body_bytes ({budget}) must be at least "
                f"max_body_bytes ({self.max_body_bytes}): else no body of that size is ever read"
            )
        return self

    @field_validator("trusted_proxies")
    @classmethod
    def _proxy_addresses(cls, value: str) -> str:
        entries = [entry.strip() for entry in value.split(",") if entry.strip()]
        for entry in entries:
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError:
                raise ValueError(
                    f"{entry[:60]!r} is not an IP address or network: list the reverse "
                    "proxies' addresses, comma-separated (e.g. 127.0.0.1,10.0.0.0/24)"
                ) from None
        return ",".join(entries)

    @field_validator("database_url")
    @classmethod
    def _known_database(cls, value: str) -> str:
        """SQLite, or PostgreSQL through psycopg (the driver installed): a URL as a DBA
        hands it out (`postgres://`, `postgresql://`) is taken for the latter. Anything else
        is refused here, in plain words, rather than as a driver's traceback later."""
        scheme, separator, rest = value.partition("://")
        if not separator:
            raise ValueError("must be a URL: sqlite:///PATH or postgresql+psycopg://USER@HOST/DB")
        if scheme in ("postgres", "postgresql"):
            return f"postgresql+psycopg://{rest}"
        if scheme not in ("sqlite", "postgresql+psycopg"):
            raise ValueError(
                f"unsupported database {scheme!r}: use sqlite:///PATH or "
                "postgresql+psycopg://USER@HOST/DB"
            )
        return value

    @field_validator("public_url")
    @classmethod
    def _strip_slash(cls, value: str | None) -> str | None:
        return value.rstrip("/") if value else value


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()


# Seconds between a post's last lease check and its first byte, at most (loading the
# envelope, the thread pool's queue): kept in hand when judging whether a lease would last.
LEASE_MARGIN_SECONDS = 5.0


def body_idle_seconds(settings: Settings) -> float:
    """How long a request's body may send nothing before the node takes its sender for gone
    (app/evidence/pump.py): twice a peer's own read timeout."""
    return 2 * settings.peer_timeout_seconds


def buffered_body_budget(settings: Settings) -> tuple[int, int]:
    """The bytes of request bodies the process may hold in memory, in all and per source
    address (half, but at least one body of the largest size)."""
    # Eight bodies: half of it is four, what one peer's worker may post at once (with four
    # in all, a third large envelope from one peer was refused half way, from review).
    total = settings.max_buffered_body_bytes or 8 * settings.max_body_bytes
    return total, min(total, max(total // 2, settings.max_body_bytes))


def longest_exchange_seconds(settings: Settings) -> float:
    """The longest one exchange with a peer can last: the connection (at most 10 s of the
    timeout) and the client's deadline of four timeouts (app/peers/client.py)."""
    timeout = settings.peer_timeout_seconds
    return min(timeout, 10.0) + 4 * timeout
