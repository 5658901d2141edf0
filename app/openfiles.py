"""As many open files as the system lets a node's process have.

A node holds a descriptor per connection, per database connection, per evidence upload or
part under way and per kept writer (capped, app/evidence/drafts.py). Linux starts services
at a soft limit of 1,024 (systemd's default, for `select()`'s sake, which nothing here uses)
with a hard limit far above it: at 1,024, one client's uploads took every descriptor and the
database could no longer be synced (from review). The soft limit is raised to the hard one,
up to WANTED, as Go's runtime and nginx's `worker_rlimit_nofile` do.
"""

from __future__ import annotations

import resource

WANTED = 65536


def raise_open_files_limit() -> int:
    """Raise this process's soft limit on open files; returns the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = WANTED if hard == resource.RLIM_INFINITY else min(hard, WANTED)
    if soft == resource.RLIM_INFINITY or soft >= target:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):  # a sandbox refusing it: the limit stays as it was
        return soft
    return target
