"""/metrics: Prometheus text format, for a `monitor` client's token (or an `admin`'s), as
a scraper sends it (`authorization: {type: Bearer, credentials_file: ...}`); without one
where the operator set ENTRAIDE_METRICS_PUBLIC. See app.obs.metrics for what it shows, and
docs/operations.md section 6."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response

from app.deps import METRICS
from app.obs.metrics import CONTENT_TYPE, Metrics

router = APIRouter(tags=["monitoring"], dependencies=[Depends(METRICS)])


@router.get("/metrics", include_in_schema=False)
def metrics(request: Request) -> Response:
    registry: Metrics = request.app.state.metrics
    return Response(registry.render(), media_type=CONTENT_TYPE)
