"""The auditor's query index over the log, filled in batches behind the appends.

Indexing each entry under its six filter columns as it is appended would make every append
write six more index pages, much of what an append costs. Instead, `audit_index` repeats an
entry's filter columns with an index per filter, and is filled a batch at a time: by the
delivery worker once `INDEX_BATCH` entries are waiting or when it signs a checkpoint, and by
a query that finds more than `MAX_TAIL` waiting. Consecutive entries share index pages, so a
batch writes each page once for many entries.

The entries not yet indexed, the tail, are read from the log itself by queries. Entries
commit in index order (an append holds the head row until its transaction ends), so the
indexed entries are always a prefix of the log, and filling is idempotent: two workers
indexing the same entries at once store each of them once.
"""

from __future__ import annotations

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from app.models import AuditIndex

INDEX_BATCH = 256
MAX_TAIL = 4096
CHUNK = 20_000  # entries indexed per statement
# The same on SQLite and PostgreSQL; entries indexed already (by another worker) are skipped.
_INDEX = text(
    "INSERT INTO audit_index (idx, recorded_at, actor, action, outcome, request_id, peer) "
    "SELECT idx, recorded_at, actor, action, outcome, request_id, peer FROM audit_entries "
    "WHERE idx >= :first AND idx < :end ON CONFLICT (idx) DO NOTHING"
)


def indexed_size(session: Session) -> int:
    """How many entries, from the first, the index holds."""
    largest = session.scalar(select(func.max(AuditIndex.idx)))
    return 0 if largest is None else largest + 1


def index_entries(session: Session, *, start: int, end: int) -> None:
    """Index entries `start` to `end - 1` (those that exist; any already indexed are kept)."""
    for first in range(start, end, CHUNK):
        session.execute(_INDEX, {"first": first, "end": min(end, first + CHUNK)})


def catch_up(session: Session, *, size: int, indexed: int, batch: int = INDEX_BATCH) -> None:
    """Index the tail, from entry `indexed` on, if at least `batch` entries wait: at most
    CHUNK of them, so that a long backlog (a log filled from outside) never stalls a round."""
    if size - indexed >= max(batch, 1):
        index_entries(session, start=indexed, end=min(size, indexed + CHUNK))
