"""/metrics: Prometheus text format. No token (scrapers rarely hold one); see app.obs.metrics
for what it shows, and docs/operations.md for restricting it at the reverse proxy."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response

from app.deps import PUBLIC
from app.obs.metrics import CONTENT_TYPE, Metrics

router = APIRouter(tags=["public"], dependencies=[Depends(PUBLIC)])


@router.get("/metrics", include_in_schema=False)
def metrics(request: Request) -> Response:
    registry: Metrics = request.app.state.metrics
    return Response(registry.render(), media_type=CONTENT_TYPE)
