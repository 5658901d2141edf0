"""What the live rotation tests share: AR's passphrase, its `entraide worker` process, and
a node's identity document as its peers read it."""

from __future__ import annotations

import subprocess
from pathlib import Path

import httpx

from app.crypto.identity import PeerIdentity, parse_identity_document
from app.forkserver import ForkedProcess
from app.localnodes import LocalNode, spawn_entraide

PASSPHRASE = "a long passphrase for AR's keys"
Process = subprocess.Popen[bytes] | ForkedProcess


def start_worker(node: LocalNode, log_path: Path) -> Process:
    """`entraide worker` beside the node's `serve`, as an operator scales out."""
    with log_path.open("ab") as log:
        return spawn_entraide(["worker"], node.env(), log.fileno())


def identity(node: LocalNode) -> PeerIdentity:
    document = httpx.get(node.url + "/.well-known/entraide/node", timeout=10).json()
    return parse_identity_document(document)
