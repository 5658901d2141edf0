"""Container health probe: exit 0 if the URL answers 200 (the node's /readyz), else 1."""

import sys
import urllib.error
import urllib.request

try:
    with urllib.request.urlopen(sys.argv[1], timeout=5) as response:  # noqa: S310  # our own URL
        sys.exit(0 if response.status == 200 else 1)
except (urllib.error.URLError, OSError):
    sys.exit(1)
