"""Node settings, read from ENTRAIDE_* environment variables."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

AUTHORITY_ID_PATTERN = r"^[A-Z]{2}/[A-Z0-9_-]{1,32}$"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ENTRAIDE_", extra="ignore")

    database_url: str = "sqlite:///./entraide.db"
    keys_dir: Path = Path("./keys")
    authority_id: str | None = Field(default=None, pattern=AUTHORITY_ID_PATTERN)
    name: str | None = None
    public_url: str | None = None

    # Plain HTTP between nodes exposes routing metadata and invites downgrade; only tests
    # and the local demo may turn this on.
    allow_insecure_http: bool = False

    # Hostile-input bounds, checked before any cryptographic work.
    max_body_bytes: int = 32 * 1024 * 1024
    max_envelope_parts: int = 64
    max_header_bytes: int = 64 * 1024
    max_attachment_bytes: int = 16 * 1024 * 1024

    # Envelope lifetime and tolerated clock skew between nodes.
    envelope_ttl_seconds: int = 7 * 24 * 3600
    clock_skew_seconds: int = 300

    # Delivery.
    run_worker: bool = True
    worker_poll_seconds: float = 0.5
    peer_timeout_seconds: float = 30.0
    lease_seconds: int = 120

    # Audit log checkpoints: every N entries or T seconds, whichever comes first.
    audit_checkpoint_every: int = 1000
    audit_checkpoint_seconds: float = 60.0

    @field_validator("public_url")
    @classmethod
    def _strip_slash(cls, value: str | None) -> str | None:
        return value.rstrip("/") if value else value


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
