"""The local API for the authority's own systems: requests, messages, attachments."""
