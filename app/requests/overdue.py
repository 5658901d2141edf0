"""Overdue requests, counted for monitoring (the /metrics gauge `entraide_requests_overdue`)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.models import CaseFile


def overdue_counts(session: Session, *, now: datetime) -> dict[tuple[str, str], int]:
    """Requests whose current deadline has passed, by (direction, status).

    Counts only: the ids of late requests stay behind the officers' API
    (`GET /api/v1/requests?overdue=true`). Restricted requests are left out: the gauge is
    served without a token, and an officer comparing it with their own list would count the
    requests hidden from them, whose existence is itself need-to-know (from review). Their
    officers see them in that list; an administrator sees every restricted request at
    `GET /api/v1/admin/requests/restricted`.
    """
    rows = session.execute(
        select(CaseFile.direction, CaseFile.status, func.count())
        .where(CaseFile.due_at < now, CaseFile.restricted.is_(False))
        .group_by(CaseFile.direction, CaseFile.status)
    )
    return {(str(direction), str(status)): int(count) for direction, status, count in rows}
