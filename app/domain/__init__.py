"""What authorities exchange: the request document and the messages of its conversation.

These models are the plaintext that envelopes seal; nothing here does I/O or cryptography.
"""
