"""API clients, bearer tokens and roles for the local API."""
