"""How many values a JSON text would build, counted before it is parsed.

Parsing is what costs: 32 MiB of `[{},{},...]` is 11 million dicts, about 770 MiB, built
before any check runs. Bodies are counted before FastAPI parses them (app/main.py), and an
envelope's inner manifest before it is parsed (app/crypto/envelope.py): it is decrypted from
ciphertext that step 1's count of the body never saw.
"""

from __future__ import annotations

import re

# The values a JSON body may hold. The largest valid document (app/domain, every list at its
# maximum) holds about 100,000; an envelope or a batch of 64 a few hundred. Parsing is what
# costs: 32 MiB of `[{},{},...]` is 11 million dicts, about 770 MiB, built before any check
# or authentication runs (FastAPI parses a body before it resolves the route's token).
MAX_JSON_VALUES = 250_000
# A string (escapes included), or a byte that starts a value inside a container. A string
# left open runs to the end of the body (and a lone backslash may end it): the pattern then
# matches at every quote it starts at, and the scan stays linear. A string that could fail to
# match was tried again from each later quote, to the end each time: a body of escaped quotes
# with no closing one took minutes, holding the interpreter (from review).
_JSON_TOKEN = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*\\?(?:"|\Z)|[,:\[{]', re.DOTALL)
_JSON_START = re.compile(rb"[ \t\r\n]*[\[{]")


def json_values_exceed(raw: bytes, limit: int = MAX_JSON_VALUES) -> bool:
    """Whether `raw`, read as JSON, would hold more than `limit` values: every value after
    the first follows a comma, a colon or an opening bracket outside strings. Those bytes
    counted anywhere bound the count from above, so most bodies are cleared by four
    `bytes.count` calls; otherwise strings are skipped whole and the scan stops at `limit`."""
    if not _JSON_START.match(raw):
        return False  # a scalar, or not JSON: nothing to build
    if sum(raw.count(byte) for byte in (b",", b":", b"[", b"{")) <= limit:
        return False
    count = 0
    for token in _JSON_TOKEN.finditer(raw):
        if token.end() - token.start() == 1:  # a string is at least two bytes
            count += 1
            if count > limit:
                return True
    return False
