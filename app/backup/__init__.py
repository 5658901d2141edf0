"""Backups of a node and restoring them: `service` (the commands), `dump` (the database's
rows, backend-neutral), `sealed` (private keys under a passphrase)."""
