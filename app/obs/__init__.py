"""Observability: request ids and JSON logs, Prometheus metrics, readiness checks.

logs.py        the request id (a context variable), the JSON log formatter
middleware.py  the ASGI middleware: request id in and out, per-route counters, access log
metrics.py     process counters and the database-backed gauges computed at scrape time
health.py      the readiness checks behind /readyz
router.py      /metrics
"""
