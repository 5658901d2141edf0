"""Recovery after a restore: a node restored from a backup asks each peer for what the two
exchanged after it, and takes it back in the order it first took it (docs/operations.md)."""
