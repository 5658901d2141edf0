# An Entraide node: `entraide serve`, `entraide worker` and the operator commands.
# docker-compose.yml runs two nodes from this image; docs/operations.md explains both.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    ENTRAIDE_KEYS_DIR=/var/lib/entraide/keys \
    ENTRAIDE_DATABASE_URL=sqlite:////var/lib/entraide/data/entraide.db

# The node never runs as root; keys and the SQLite database live in volumes it owns.
RUN useradd --system --uid 10001 --home-dir /var/lib/entraide --shell /usr/sbin/nologin entraide \
    && mkdir -p /var/lib/entraide/keys /var/lib/entraide/data /var/lib/entraide/state \
        /var/lib/entraide/blobs /var/lib/entraide/shared \
    && chown -R entraide:entraide /var/lib/entraide \
    && chmod 700 /var/lib/entraide/keys

WORKDIR /opt/entraide
# Dependencies first, so a code change does not reinstall them.
COPY pyproject.toml README.md constraints.txt ./
COPY app/__init__.py app/py.typed ./app/
RUN pip install --constraint constraints.txt --editable . && rm -rf app
# The code, the migrations (alembic.ini next to them: `alembic upgrade head` works from
# here) and the deployment helpers. Installed in place: the node finds its migrations
# relative to its own code.
COPY alembic.ini ./
COPY migrations ./migrations
COPY app ./app
COPY deploy ./deploy
COPY docs/examples ./docs/examples
# Compiled once at build time: PYTHONDONTWRITEBYTECODE would otherwise make every process
# compile the whole app before it starts.
RUN python -m compileall -q app migrations

USER entraide
EXPOSE 8600
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "deploy/probe.py", "http://127.0.0.1:8600/readyz"]
CMD ["entraide", "serve", "--host", "0.0.0.0", "--port", "8600"]
