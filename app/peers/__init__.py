"""Pinned peer nodes: adding them by URL and fingerprint, and calling them."""
