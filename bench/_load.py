"""Shared by the request-path benchmarks: request bodies, a lean HTTP load generator, the
machine's raw cryptographic rates, and what a process costs (CPU, resident memory).

The load generator speaks HTTP/1.1 over asyncio streams with pre-built request bytes and
keep-alive connections. On a 2-core machine it shares the CPUs with the nodes it loads, so it
is kept as cheap as possible: every cycle it spends is one the server does not get, and the
same generator drives the floor endpoint, so both figures pay the same tax.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import json
import os
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
REQUEST_BYTES = 2048


# --- bodies ---------------------------------------------------------------------------------


def _trimmed_example() -> dict[str, Any]:
    """docs/examples/request.json without its attachment, one item of each list, and prose
    cut short, so that a summary of facts of several hundred bytes brings it to 2 KiB."""
    body: dict[str, Any] = json.loads((ROOT / "docs" / "examples" / "request.json").read_text())
    body["attachments"] = []
    document = body["document"]
    document["assistance_sought"] = [{**document["assistance_sought"][0], "person_refs": ["P1"]}]
    document["offences"] = document["offences"][:1]
    document["persons"] = document["persons"][:1]
    for optional in ("electronic_data", "deadlines", "classification"):
        document.pop(optional, None)

    def cut(value: Any) -> Any:
        if isinstance(value, str) and " " in value:  # prose only: codes and ids stay whole
            return value[:48]
        if isinstance(value, list):
            return [cut(item) for item in value]
        if isinstance(value, dict):
            return {key: cut(item) for key, item in value.items()}
        return value

    trimmed: dict[str, Any] = cut(body)
    return trimmed


def request_bodies(count: int, *, seed: int = 1, size: int = REQUEST_BYTES) -> list[bytes]:
    """`count` different, valid submissions of about `size` bytes each (UTF-8 JSON).

    Each differs in its file numbers, dates and summary of facts (a different slice of the
    example's facts, with a serial), so no two sealed envelopes share plaintext.
    """
    rng = random.Random(seed)
    template = _trimmed_example()
    facts: str = json.loads((ROOT / "docs" / "examples" / "request.json").read_text())["document"][
        "summary_of_facts"
    ]
    words = facts.split()
    bodies = []
    for serial in range(count):
        body = copy.deepcopy(template)
        document = body["document"]
        document["proceeding"]["file_number"] = f"DP {rng.randrange(1, 9999)}/2026"
        document["references"]["requesting"] = f"SGCJI-CR-2026-{serial:05d}"
        requested = date.today() + timedelta(days=rng.randrange(10, 60))
        document["urgency"]["requested_date"] = requested.isoformat()
        document["summary_of_facts"] = ""
        room = size - len(json.dumps(body, ensure_ascii=False).encode())
        start = rng.randrange(len(words) // 2)
        text = f"[{serial}] " + " ".join(words[start:])
        while len(text.encode()) < room:
            text += " " + " ".join(words)
        encoded = text.encode()[:room]
        document["summary_of_facts"] = encoded.decode("utf-8", errors="ignore").rstrip()
        bodies.append(json.dumps(body, ensure_ascii=False).encode())
    return bodies


# --- the load generator ----------------------------------------------------------------------


def http_request(
    host: str, port: int, path: str, body: bytes, headers: dict[str, str] | None = None
) -> bytes:
    lines = [
        f"POST {path} HTTP/1.1",
        f"host: {host}:{port}",
        "content-type: application/json",
        f"content-length: {len(body)}",
        *(f"{name}: {value}" for name, value in (headers or {}).items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class _Connection:
    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def send(self, raw: bytes, timeout: float) -> tuple[int, bytes]:
        if self.writer is None or self.writer.is_closing():
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        self.writer.write(raw)
        try:
            head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), timeout)
            status = int(head[9:12])
            length = 0
            close = False
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value)
                elif name == b"connection" and value.strip().lower() == b"close":
                    close = True
            body = await asyncio.wait_for(self.reader.readexactly(length), timeout)
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            self.close()
            raise
        if close:
            self.close()
        return status, body

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.writer = None
        self.reader = None


@dataclass
class Sent:
    scheduled: float  # wall-clock seconds when the request was due to be sent
    started: float  # wall clock when it was written to a connection
    finished: float
    status: int
    body: bytes


@dataclass
class LoadResult:
    mode: str
    target_rate: float | None
    concurrency: int
    started: float  # wall clock
    duration: float
    sent: list[Sent] = field(default_factory=list)
    errors: int = 0
    cpu_seconds: float = 0.0  # this process's CPU during the run (the generator's cost)

    @property
    def ok(self) -> list[Sent]:
        return [item for item in self.sent if item.status in (200, 201)]

    def rate(self, since: float = 0.0) -> float:
        """Successful requests per second completed in [started + since, started + duration]."""
        lower = self.started + since
        upper = self.started + self.duration
        done = sum(1 for item in self.ok if lower <= item.finished <= upper)
        return done / max(upper - lower, 1e-9)

    def statuses(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for item in self.sent:
            counts[str(item.status)] = counts.get(str(item.status), 0) + 1
        if self.errors:
            counts["transport_error"] = self.errors
        return counts


async def _drive(
    host: str,
    port: int,
    requests: Sequence[bytes],
    *,
    rate: float | None,
    duration: float,
    concurrency: int,
    timeout: float,
) -> LoadResult:
    connections: asyncio.Queue[_Connection] = asyncio.Queue()
    for _ in range(concurrency):
        connections.put_nowait(_Connection(host, port))
    result = LoadResult(
        mode="fixed" if rate else "max",
        target_rate=rate,
        concurrency=concurrency,
        started=time.time(),
        duration=duration,
    )
    mono0 = time.monotonic()
    wall0 = result.started
    cpu0 = time.process_time()
    serial = 0

    async def one(raw: bytes, scheduled: float) -> None:
        connection = await connections.get()
        started = wall0 + (time.monotonic() - mono0)
        try:
            status, body = await connection.send(raw, timeout)
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError, ValueError):
            result.errors += 1
            return
        finally:
            connections.put_nowait(connection)
        finished = wall0 + (time.monotonic() - mono0)
        result.sent.append(Sent(scheduled, started, finished, status, body))

    if rate:
        # Open loop: request i is due at i / rate whatever happened to the others, and its
        # latency counts from then (no coordinated omission when the server falls behind).
        tasks: set[asyncio.Task[None]] = set()
        count = int(rate * duration)
        for index in range(count):
            due = index / rate
            delay = due - (time.monotonic() - mono0)
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(one(requests[index % len(requests)], wall0 + due))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.wait(tasks, timeout=timeout + 5)
    else:
        # Closed loop: `concurrency` clients, each sending its next request on an answer.
        deadline = mono0 + duration

        async def client() -> None:
            nonlocal serial
            while time.monotonic() < deadline:
                raw = requests[serial % len(requests)]
                serial += 1
                await one(raw, wall0 + (time.monotonic() - mono0))

        await asyncio.gather(*(client() for _ in range(concurrency)))
    while not connections.empty():
        connections.get_nowait().close()
    result.cpu_seconds = time.process_time() - cpu0
    return result


def run_load(
    host: str,
    port: int,
    requests: Sequence[bytes],
    *,
    rate: float | None,
    duration: float,
    concurrency: int,
    timeout: float = 30.0,
) -> LoadResult:
    """Send `requests` (pre-built HTTP/1.1 bytes, cycled) for `duration` seconds: at `rate`
    per second (open loop), or as fast as `concurrency` connections allow (closed loop)."""
    return asyncio.run(
        _drive(
            host,
            port,
            requests,
            rate=rate,
            duration=duration,
            concurrency=concurrency,
            timeout=timeout,
        )
    )


# --- processes -------------------------------------------------------------------------------

_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def process_cpu_seconds(pid: int) -> float:
    """User plus system CPU of a process so far (its threads included)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


def resident_mib(pid: int) -> float:
    pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
    return pages * _PAGE / 2**20


# --- the machine's cryptographic rates ---------------------------------------------------------


def _per_second(action: Any, seconds: float) -> float:
    done = 0
    start = time.perf_counter()
    end = start + seconds
    while time.perf_counter() < end:
        for _ in range(50):
            action()
        done += 50
    return done / (time.perf_counter() - start)


def crypto_rates(seconds: float = 0.4) -> dict[str, float]:
    """Single-thread rates of the primitives of protocol v1 on this machine, right now."""
    from nacl.bindings import (
        crypto_secretstream_xchacha20poly1305_init_push,
        crypto_secretstream_xchacha20poly1305_push,
        crypto_secretstream_xchacha20poly1305_state,
        crypto_secretstream_xchacha20poly1305_TAG_FINAL,
    )
    from nacl.public import PrivateKey, SealedBox
    from nacl.signing import SigningKey

    key = SigningKey.generate()
    verify_key = key.verify_key
    message = os.urandom(32)  # the protocol signs a domain string plus a 32-byte hash
    signed = key.sign(message)
    recipient = PrivateKey.generate()
    box = SealedBox(recipient.public_key)
    opener = SealedBox(recipient)
    wrapped = box.encrypt(os.urandom(32))
    mib = os.urandom(2**20)

    def stream() -> None:
        state = crypto_secretstream_xchacha20poly1305_state()
        crypto_secretstream_xchacha20poly1305_init_push(state, os.urandom(32))
        crypto_secretstream_xchacha20poly1305_push(
            state, mib, None, crypto_secretstream_xchacha20poly1305_TAG_FINAL
        )

    rates = {
        "ed25519_sign_per_s": _per_second(lambda: key.sign(message), seconds),
        "ed25519_verify_per_s": _per_second(lambda: verify_key.verify(signed), seconds),
        "sealed_box_wrap_per_s": _per_second(lambda: box.encrypt(message), seconds),
        "sealed_box_unwrap_per_s": _per_second(lambda: opener.decrypt(wrapped), seconds),
        "secretstream_mib_per_s": _per_second(stream, seconds),
        "sha256_mib_per_s": _per_second(lambda: hashlib.sha256(mib).digest(), seconds),
    }
    return {name: round(value, 1) for name, value in rates.items()}
