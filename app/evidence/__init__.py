"""Electronic evidence of any size: blob store outside the database, streamed part encryption."""
