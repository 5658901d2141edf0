"""Delivering outbound envelopes to peers and collecting their signed receipts."""
