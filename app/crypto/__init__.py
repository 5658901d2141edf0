"""Protocol v1 cryptography: node keys, identity documents, envelopes and receipts."""
