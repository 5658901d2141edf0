"""Large evidence: one attachment streamed, encrypted, transferred, checked and decrypted.

    python bench/evidence.py [--size 1GiB] [--runs 3]

What each run measures, all on the same file of random bytes:

- ceiling: this machine's single-pass hash-and-encrypt speed (SHA-256 of the plaintext,
  secretstream push, SHA-256 of the ciphertext, 1 MiB chunks), one core, file in page cache;
- gpg: `gpg --symmetric` (AES-256, passphrase, no compression) on the same file;
- throughput: the evidence pipeline end to end, in two separate processes. The sender
  process reads the file and encrypts it into its blob store (app.evidence.stream.PartWriter),
  then streams the blob to the receiver process over loopback TCP; the receiver writes it
  into its own blob store while hashing it, checks length and ciphertext SHA-256, then
  decrypts it streaming (final tag required) and checks the plaintext SHA-256, as a download
  does. Peak resident memory of each process is reported.

LIMITATION (stated, not hidden): the two processes are the evidence pipeline of app/evidence,
not `entraide serve` nodes: the node's upload API and the peer part-transfer endpoints are not
built yet, so the transfer is raw TCP, not HTTP between nodes.

Prints the figures, writes bench/results/evidence.json, and prints the summary as its last
line, one JSON object.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import nacl.bindings as sodium

from app.crypto.envelope import (
    CHUNK_BYTES,
    TAG_FINAL,
    TAG_MESSAGE,
    part_ad,
    part_key,
)
from app.evidence.blobstore import DirectoryBlobStore
from app.evidence.stream import (
    CIPHER_CHUNK,
    PartWriter,
    check_blob,
    decrypt_stream,
    read_blob,
)
from bench._common import machine, median, medians, write_results

KEY = bytes(range(32))
MSG_ID = bytes(16)
AD = part_ad(MSG_ID, 1)
STREAM_HEADER = bytes(range(24))
PART_KEY = part_key(KEY, MSG_ID, 1)
MIB = 1 << 20


def parse_size(text: str) -> int:
    match = re.fullmatch(r"(\d+)\s*([KMG]i?B?)?", text.strip(), re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text}")
    unit = (match.group(2) or "").upper()[:1]
    return int(match.group(1)) * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[unit]


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --- roles (child processes) --------------------------------------------------------------


def sender(path: Path, root: Path, port: int) -> dict[str, Any]:
    size = path.stat().st_size
    store = DirectoryBlobStore(root)
    wall_started = time.time()  # compared across processes: wall clock
    started = time.perf_counter()
    writer = PartWriter.open(
        store, "bench-upload", key=PART_KEY, ad=AD, stream_header=STREAM_HEADER, size=size
    )
    with path.open("rb") as source:
        while piece := source.read(256 * 1024):
            writer.write(piece)
    part = writer.finalise(store)
    encrypted = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=60) as connection:
        header = json.dumps(
            {"length": part.length, "sha256": part.digest, "plain": part.plaintext_sha256}
        ).encode()
        connection.sendall(len(header).to_bytes(4, "big") + header)
        with store.open(part.digest) as blob:
            connection.sendfile(blob)
        connection.shutdown(socket.SHUT_WR)
        answer = connection.recv(4096)
    done = time.perf_counter()
    return {
        "wall_started": wall_started,
        "encrypt_s": encrypted - started,
        "send_s": done - encrypted,
        "receiver_answer": answer.decode(),
        "peak_rss_mib": peak_rss_mib(),
    }


def receiver(root: Path, ready: Path) -> dict[str, Any]:
    store = DirectoryBlobStore(root)
    with socket.create_server(("127.0.0.1", 0)) as server:
        ready.write_text(str(server.getsockname()[1]))
        connection, _ = server.accept()
        with connection:
            length_prefix = connection.recv(4, socket.MSG_WAITALL)
            meta = json.loads(
                connection.recv(int.from_bytes(length_prefix, "big"), socket.MSG_WAITALL)
            )
            started = time.perf_counter()
            digest = hashlib.sha256()
            received = 0
            with store.upload("bench-receive") as upload:
                while chunk := connection.recv(CIPHER_CHUNK):
                    received += len(chunk)
                    if received > meta["length"]:
                        raise SystemExit("longer than declared")
                    digest.update(chunk)
                    upload.write(chunk)
                if received != meta["length"] or digest.hexdigest() != meta["sha256"]:
                    connection.sendall(b"refused")
                    raise SystemExit("part refused: length or hash")
                store.finalise(upload, meta["sha256"])
            received_at = time.perf_counter()
            # The download: ciphertext hash checked before any plaintext, then decrypted.
            with store.open(meta["sha256"]) as blob:
                check_blob(blob, length=meta["length"], sha256=meta["sha256"])
            plain = 0
            with store.open(meta["sha256"]) as blob:
                for message in decrypt_stream(
                    read_blob(blob),
                    key=PART_KEY,
                    ad=AD,
                    stream_header=STREAM_HEADER,
                    plaintext_sha256=meta["plain"],
                ):
                    plain += len(message)
            connection.sendall(b"ok")
    done = time.perf_counter()
    return {
        "wall_done": time.time(),
        "receive_s": received_at - started,
        "download_s": done - received_at,
        "plaintext_bytes": plain,
        "peak_rss_mib": peak_rss_mib(),
    }


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


def pipeline(path: Path, workdir: Path) -> dict[str, Any]:
    for name in ("sender-blobs", "receiver-blobs"):
        shutil.rmtree(workdir / name, ignore_errors=True)
    ready = workdir / "port"
    ready.unlink(missing_ok=True)
    me = [sys.executable, str(Path(__file__).resolve())]
    started = time.perf_counter()
    receiving = subprocess.Popen(
        [
            *me,
            "--role",
            "receiver",
            "--root",
            str(workdir / "receiver-blobs"),
            "--ready",
            str(ready),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    while not ready.exists() or not ready.read_text():
        time.sleep(0.01)
    sending = subprocess.run(
        [
            *me,
            "--role",
            "sender",
            "--root",
            str(workdir / "sender-blobs"),
            "--file",
            str(path),
            "--port",
            ready.read_text(),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    out, _ = receiving.communicate(timeout=3600)
    elapsed = time.perf_counter() - started
    if receiving.returncode != 0:
        raise SystemExit("receiver failed")
    sent, got = json.loads(sending.stdout.splitlines()[-1]), json.loads(out.splitlines()[-1])
    if got["plaintext_bytes"] != path.stat().st_size or sent["receiver_answer"] != "ok":
        raise SystemExit("the pipeline did not deliver the file intact")
    data_path = got["wall_done"] - sent["wall_started"]
    return {
        # From the sender's first byte read to the receiver's last byte decrypted and checked,
        # both processes already running (as nodes are); elapsed_s adds their start-up.
        "throughput_mib_s": path.stat().st_size / MIB / data_path,
        "data_path_s": data_path,
        "elapsed_s": elapsed,
        "encrypt_s": sent["encrypt_s"],
        "transfer_s": got["receive_s"],
        "download_s": got["download_s"],
        "peak_rss_mib_sender": sent["peak_rss_mib"],
        "peak_rss_mib_receiver": got["peak_rss_mib"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=parse_size, default=parse_size("64MiB"))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--role", choices=["sender", "receiver"])
    parser.add_argument("--root", type=Path)
    parser.add_argument("--ready", type=Path)
    parser.add_argument("--file", type=Path)
    parser.add_argument("--port", type=int)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    if args.role == "sender":
        print(json.dumps(sender(args.file, args.root, args.port)))
        return
    if args.role == "receiver":
        print(json.dumps(receiver(args.root, args.ready)))
        return

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        workdir = Path(tmp)
        path = workdir / "evidence.bin"
        with path.open("wb") as out:
            left = args.size
            while left:
                out.write(os.urandom(min(left, 8 * MIB)))
                left -= min(left, 8 * MIB)
        runs = []
        for number in range(args.runs):
            run = {"ceiling_mib_s": ceiling(path), "gpg_mib_s": gpg(path, workdir)}
            run.update(pipeline(path, workdir))
            runs.append(run)
            print(
                f"run {number + 1}: "
                + json.dumps(
                    {k: round(v, 1) if isinstance(v, float) else v for k, v in run.items()}
                )
            )
    figures = medians(runs)
    summary = {
        "size_bytes": args.size,
        "runs": args.runs,
        "throughput_mib_s": round(figures["throughput_mib_s"], 1),
        "ceiling_mib_s": round(figures["ceiling_mib_s"], 1),
        "gpg_mib_s": round(figures["gpg_mib_s"], 1) if "gpg_mib_s" in figures else None,
        "peak_rss_mib_sender": round(max(run["peak_rss_mib_sender"] for run in runs), 1),
        "peak_rss_mib_receiver": round(max(run["peak_rss_mib_receiver"] for run in runs), 1),
        "throughput_over_ceiling": round(figures["throughput_mib_s"] / figures["ceiling_mib_s"], 2),
        "mode": "pipeline: two processes over loopback TCP, not entraide serve nodes",
    }
    write_results(
        "evidence",
        {
            "machine": machine(),
            "args": {"size": args.size, "runs": args.runs},
            "runs": runs,
            "medians": figures,
            "summary": summary,
            "median_of": median.__name__,
        },
    )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
