"""The peer-to-peer API: what other nodes call."""
