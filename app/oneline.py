"""Text that an operator's terminal or a log prints as one line, exactly as it reads.

For names and reasons that come from outside (a peer's identity document, an operator's
reason) and are printed by `entraide peers list` and kept in the audit trail: a line break
there forges a second line, an escape sequence recolours or rewrites the terminal, and a
bidirectional override shows the text in another order than it is stored.
"""

from __future__ import annotations

import re

# C0 controls and DEL, C1 controls, the line and paragraph separators (`splitlines` breaks
# on them), the bidirectional marks, embeddings, overrides and isolates, and lone
# surrogates: no UTF-8 encodes them, so neither a database nor a terminal takes one (a
# suspension's reason holding one was a 500, from review; a command-line argument of bytes
# that are not UTF-8 arrives so).
_UNSAFE = re.compile(
    "[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]"
)


def is_one_line(text: str) -> bool:
    return _UNSAFE.search(text) is None


def one_line(text: str, replacement: str = "?") -> str:
    """The text with each such character replaced: what a peer chose (an attachment's name,
    a delivery error) printed on a terminal as it reads, never as the terminal obeys it."""
    return _UNSAFE.sub(replacement, text)
