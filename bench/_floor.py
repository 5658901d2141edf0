"""The floor: the least a Python gateway on this stack can do per request, on this machine.

    python -m bench._floor --database-url URL --port PORT

A bare FastAPI endpoint, served exactly as `entraide serve` serves the node (one uvicorn
process, the same `uvicorn.run` options, a synchronous route in the thread pool), that accepts
a JSON body of the submission's size and inserts one row into the same kind of database with
the node's engine settings (app.db: SQLite WAL + synchronous=FULL + BEGIN IMMEDIATE, or the
PostgreSQL pool). No authentication, sealing, audit or delivery: the node's figure divided by
this one is the share of the machine the product's guarantees leave for the traffic.
"""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime
from typing import Any

from fastapi import FastAPI
from sqlalchemy import Column, DateTime, Integer, LargeBinary, MetaData, Table, insert

from app.db import make_engine

METADATA = MetaData()
ROWS = Table(
    "floor_rows",
    METADATA,
    Column("id", Integer, primary_key=True),
    Column("received_at", DateTime(timezone=True), nullable=False),
    Column("body", LargeBinary, nullable=False),
)


def create_floor_app(database_url: str) -> FastAPI:
    engine = make_engine(database_url)
    METADATA.create_all(engine)
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)

    @app.post("/floor", status_code=201)
    def floor(payload: dict[str, Any]) -> dict[str, int]:
        with engine.begin() as connection:
            row = connection.execute(
                insert(ROWS)
                .values(received_at=datetime.now(UTC), body=json.dumps(payload).encode())
                .returning(ROWS.c.id)
            ).scalar_one()
        return {"id": row}

    @app.get("/readyz")
    def ready() -> dict[str, str]:
        return {"status": "ok"}

    return app


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser()
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    # The options of app.nodeproc.serve, word for word (TLS aside: the node runs plain HTTP here).
    uvicorn.run(
        create_floor_app(args.database_url),
        host="127.0.0.1",
        port=args.port,
        log_level="info",
        log_config=None,
        access_log=False,
        proxy_headers=False,  # as serve's, with no trusted proxy named (the default)
    )


if __name__ == "__main__":
    main()
