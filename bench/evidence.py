"""Large evidence between two nodes: one attachment uploaded, sealed, sent, downloaded.

    python bench/evidence.py [--size 1GiB] [--runs 3]

Two `entraide serve` processes on loopback (app/localnodes.py, SQLite, shipped defaults but
quiet logs). Each run, on the same file of random bytes:

- throughput: from the first byte uploaded to ES/MJ's local API (one streamed PATCH; the node
  encrypts and hashes as it receives) to the last byte downloaded from AR/MPF (streamed
  decryption, final tag and manifest SHA-256 checked), through submission, the part transfer
  between the nodes (checked chunk by chunk by the receiver) and the signed receipt;
- peak resident memory of each node process (VmHWM), over all runs so far, and its resident
  memory when idle (VmRSS once started and pinned, before the first run);
- ceiling: this machine's single-pass hash-and-encrypt speed (SHA-256 of the plaintext,
  secretstream push, SHA-256 of the ciphertext, 1 MiB chunks), one core, file in page cache;
- gpg: `gpg --symmetric` (AES-256, passphrase, no compression) on the same file;
- where the time goes: the CPU seconds, user and system apart, that the sender node, the
  receiver node and this client each spent in each phase (upload, transfer, download).

Prints each run, writes bench/results/evidence.json, and prints the summary (medians; peak
memory as the maximum) as its last line, one JSON object.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx
import nacl.bindings as sodium

from app.crypto.envelope import (
    CHUNK_BYTES,
    TAG_FINAL,
    TAG_MESSAGE,
    part_ad,
    part_key,
)
from app.localnodes import LocalNode
from bench._common import machine, medians, write_results

KEY = bytes(range(32))
MSG_ID = bytes(16)
AD = part_ad(MSG_ID, 1)
STREAM_HEADER = bytes(range(24))
PART_KEY = part_key(KEY, MSG_ID, 1)
MIB = 1 << 20
# How often the client looks for the receipt: each look is a full request view at ES, a few
# milliseconds of its CPU, so polling much faster would slow the transfer it waits for.
POLL_SECONDS = 0.1


def parse_size(text: str) -> int:
    match = re.fullmatch(r"(\d+)\s*([KMG]i?B?)?", text.strip(), re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text}")
    unit = (match.group(2) or "").upper()[:1]
    return int(match.group(1)) * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[unit]


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --- measurements in the parent -----------------------------------------------------------


def ceiling(path: Path) -> float:
    state = sodium.crypto_secretstream_xchacha20poly1305_state()
    sodium.crypto_secretstream_xchacha20poly1305_init_pull(state, STREAM_HEADER, PART_KEY)
    plain_hash, cipher_hash = hashlib.sha256(), hashlib.sha256()
    size = path.stat().st_size
    done = 0
    started = time.perf_counter()
    with path.open("rb") as source:
        while chunk := source.read(CHUNK_BYTES):
            done += len(chunk)
            tag = TAG_FINAL if done == size else TAG_MESSAGE
            plain_hash.update(chunk)
            cipher_hash.update(
                sodium.crypto_secretstream_xchacha20poly1305_push(state, chunk, AD, tag)
            )
    return size / MIB / (time.perf_counter() - started)


def gpg(path: Path, workdir: Path) -> float | None:
    binary = shutil.which("gpg")
    if binary is None:
        return None
    home = workdir / "gnupg"
    home.mkdir(mode=0o700, exist_ok=True)
    out = workdir / "file.gpg"
    started = time.perf_counter()
    subprocess.run(
        [
            binary,
            "--homedir",
            str(home),
            "--batch",
            "--yes",
            "--quiet",
            "--pinentry-mode",
            "loopback",
            "--passphrase",
            "bench",
            "--symmetric",
            "--cipher-algo",
            "AES256",
            "--compress-algo",
            "none",
            "--output",
            str(out),
            str(path),
        ],
        check=True,
        capture_output=True,
    )
    elapsed = time.perf_counter() - started
    out.unlink()
    return path.stat().st_size / MIB / elapsed


# --- between two `entraide serve` nodes -----------------------------------------------------


def _status_mib(pid: int, field: str) -> float:
    text = Path(f"/proc/{pid}/status").read_text()
    match = re.search(rf"^{field}:\s*(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) / 1024 if match else float("nan")


def vm_hwm_mib(pid: int) -> float:
    """Peak resident memory of a running process (VmHWM), MiB."""
    return _status_mib(pid, "VmHWM")


def vm_rss_mib(pid: int) -> float:
    """Resident memory of a running process now (VmRSS), MiB."""
    return _status_mib(pid, "VmRSS")


def start_nodes(workdir: Path) -> tuple[Any, Any]:
    nodes = []
    for authority, name in (("ES/MJ", "Ministerio de Justicia"), ("AR/MPF", "Ministerio Publico")):
        label = authority.split("/")[0].lower()
        node = LocalNode(
            authority,
            name,
            workdir / label,
            f"sqlite:///{workdir / label}.db",
            extra_env={"ENTRAIDE_LOG_LEVEL": "WARNING"},
        )
        node.init()
        node.create_client("officer", "officer")
        node.create_client("admin", "admin")
        node.start()
        nodes.append(node)
    es, ar = nodes
    es.pin(ar)
    ar.pin(es)
    return es, ar


def _example() -> dict[str, Any]:
    body: dict[str, Any] = json.loads(
        (Path(__file__).resolve().parents[1] / "docs" / "examples" / "request.json").read_text()
    )
    body.pop("attachments", None)
    return body


def cpu_seconds(pid: int | None = None) -> tuple[float, float]:
    """User and system CPU seconds of a process so far (this one when `pid` is None)."""
    if pid is None:
        times = os.times()
        return times.user, times.system
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def phase_cpu(
    before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]]
) -> dict[str, float]:
    """CPU seconds each process spent in a phase: `<process>_user_s`, `<process>_sys_s`."""
    spent: dict[str, float] = {}
    for name in before:
        spent[f"{name}_user_s"] = round(after[name][0] - before[name][0], 2)
        spent[f"{name}_sys_s"] = round(after[name][1] - before[name][1], 2)
    return spent


def between_nodes(path: Path, es: Any, ar: Any) -> dict[str, Any]:
    """Upload to ES's local API, seal, transfer to AR, receipt back, download at AR.

    Besides the times, the CPU each process (sender, receiver, this client) spent in each
    phase, user and system apart: where the time goes, for a figure that misses its goal.
    """
    size = path.stat().st_size
    body = _example()
    body["attachments"] = [{"name": path.name, "size": size}]

    def cpu() -> dict[str, tuple[float, float]]:
        return {
            "sender": cpu_seconds(es.process.pid),
            "receiver": cpu_seconds(ar.process.pid),
            "client": cpu_seconds(),
        }

    cpu_started = cpu()
    started = time.perf_counter()
    with es.client("officer") as http:
        http.timeout = httpx.Timeout(600.0)
        draft = http.post("/api/v1/evidence/drafts", json=body).json()
        href = draft["attachments"][0]["href"]

        def read_file() -> Iterator[bytes]:
            with path.open("rb") as source:
                while data := source.read(MIB):
                    yield data

        response = http.patch(
            href, content=read_file(), headers={"upload-offset": "0", "content-length": str(size)}
        )
        if response.headers.get("upload-complete") != "?1":
            raise SystemExit(f"upload failed: {response.status_code} {response.text}")
        uploaded = time.perf_counter()
        cpu_uploaded = cpu()
        submitted = http.post(f"/api/v1/evidence/drafts/{draft['id']}/submit").json()
        request_id = submitted["id"]
        while True:
            view = http.get(f"/api/v1/requests/{request_id}").json()
            if view["messages"][0]["receipt"]:
                break
            time.sleep(POLL_SECONDS)
    delivered = time.perf_counter()
    cpu_delivered = cpu()
    with ar.client("officer") as http:
        http.timeout = httpx.Timeout(600.0)
        entry = http.get(f"/api/v1/requests/{request_id}").json()["messages"][0]["attachments"][0]
        digest = hashlib.sha256()
        received = 0
        with http.stream("GET", entry["href"]) as response:
            for data in response.iter_raw():
                digest.update(data)
                received += len(data)
    done = time.perf_counter()
    cpu_done = cpu()
    if received != size or digest.hexdigest() != entry["sha256"]:
        raise SystemExit("the file did not arrive intact")
    return {
        "throughput_mib_s": size / MIB / (done - started),
        "elapsed_s": done - started,
        "upload_s": uploaded - started,
        "transfer_s": delivered - uploaded,
        "download_s": done - delivered,
        "cpu": {
            "upload": phase_cpu(cpu_started, cpu_uploaded),
            "transfer": phase_cpu(cpu_uploaded, cpu_delivered),
            "download": phase_cpu(cpu_delivered, cpu_done),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=parse_size, default=parse_size("64MiB"))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        workdir = Path(tmp)
        path = workdir / "evidence.bin"
        with path.open("wb") as out:
            left = args.size
            while left:
                out.write(os.urandom(min(left, 8 * MIB)))
                left -= min(left, 8 * MIB)
        runs = []
        es, ar = start_nodes(workdir)
        # Idle: started, pinned, nothing sent yet (the peak includes start-up).
        idle = {
            "idle_rss_mib_sender": vm_rss_mib(es.process.pid),
            "idle_rss_mib_receiver": vm_rss_mib(ar.process.pid),
        }
        try:
            for number in range(args.runs):
                run = {"ceiling_mib_s": ceiling(path), "gpg_mib_s": gpg(path, workdir)}
                run.update(between_nodes(path, es, ar))
                run["peak_rss_mib_sender"] = vm_hwm_mib(es.process.pid)
                run["peak_rss_mib_receiver"] = vm_hwm_mib(ar.process.pid)
                runs.append(run)
                rounded = {k: round(v, 1) if isinstance(v, float) else v for k, v in run.items()}
                print(f"run {number + 1}: {json.dumps(rounded)}", flush=True)
        finally:
            es.stop()
            ar.stop()
    figures = medians(runs)
    figures["cpu"] = {
        phase: medians([run["cpu"][phase] for run in runs])
        for phase in ("upload", "transfer", "download")
    }
    summary = {
        "size_bytes": args.size,
        "runs": args.runs,
        "throughput_mib_s": round(figures["throughput_mib_s"], 1),
        "ceiling_mib_s": round(figures["ceiling_mib_s"], 1),
        "gpg_mib_s": round(figures["gpg_mib_s"], 1) if "gpg_mib_s" in figures else None,
        "peak_rss_mib_sender": round(max(run["peak_rss_mib_sender"] for run in runs), 1),
        "peak_rss_mib_receiver": round(max(run["peak_rss_mib_receiver"] for run in runs), 1),
        **{name: round(value, 1) for name, value in idle.items()},
        "throughput_over_ceiling": round(figures["throughput_mib_s"] / figures["ceiling_mib_s"], 2),
        # Median CPU seconds per phase and process: where the time goes.
        "cpu_s": figures["cpu"],
    }
    write_results(
        "evidence",
        {
            "machine": machine(),
            "args": {"size": args.size, "runs": args.runs},
            "idle": idle,
            "runs": runs,
            "medians": figures,
            "summary": summary,
        },
    )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
