"""Dependencies for routes: the unit of work, the node, and access policies.

Every route declares its access policy with `Policy` (or `PUBLIC`) next to its definition;
a test walks the application's routes and fails on any route that declares none.
"""

from __future__ import annotations

import functools
import inspect
import json
import threading
from collections.abc import Callable, Coroutine, Iterator
from typing import Annotated, Any, ParamSpec, TypeVar

from fastapi import Depends, Request, Response
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from app.audit.log import record
from app.auth.cache import TokenCache
from app.auth.refusals import already_audited, record_counted, route_of
from app.auth.service import Principal, Role, TokenRefused, authenticate, hash_token
from app.auth.throttle import (
    Limits,
    TooManyRequests,
    address_unit,
    auth_limits,
    blocked_for,
    is_blocked,
    register_refusal,
)
from app.crypto.encoding import utc_now
from app.db import read_snapshot, reading, unit_of_work
from app.errors import Forbidden, Unauthenticated, UnsupportedMediaType
from app.node import Node
from app.tls import CertificateRefused, check_peer_certificate

P = ParamSpec("P")
R = TypeVar("R")


async def get_node(request: Request) -> Node:
    # async: an attribute read needs no trip through the thread pool (nor does a cached token,
    # below); every sync dependency costs one per request.
    node: Node = request.app.state.node
    return node


NodeDep = Annotated[Node, Depends(get_node)]


def get_session(node: NodeDep) -> Iterator[Session]:
    with unit_of_work(node.sessions) as session:
        yield session


# scope="function": commit before the response is sent, so a 201 means the row is durable.
# Routes of a `UnitOfWorkRoute` commit earlier still, in their own thread (below); this exit
# then commits nothing, or rolls back what a failing route left.
SessionDep = Annotated[Session, Depends(get_session, scope="function")]


def get_reading_session(node: NodeDep) -> Iterator[Session]:
    with reading(node.sessions) as session:
        yield session


# A route that only reads, for anyone (the proofs peers fetch to witness our log): on SQLite
# it waits for no writer and holds none off, so calls that cost their sender nothing cannot
# queue the node's writes behind them.
ReadingDep = Annotated[Session, Depends(get_reading_session, scope="function")]


def commit_on_return(endpoint: Callable[P, R]) -> Callable[P, R]:
    """Commit a sync route's `session` in the route's own worker thread as it returns.

    Left to `get_session`'s exit, the commit is a second trip through the thread pool, queued
    behind whatever the event loop has to do first; meanwhile the transaction holds the audit
    log's head (every action appends to it) and, on SQLite, the writer lock, so under load
    that wait, not the work, set the pace of every writer (docs/benchmarks.md, fifth round).
    """

    @functools.wraps(endpoint)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        result = endpoint(*args, **kwargs)
        session = kwargs.get("session")
        if isinstance(session, Session):
            session.commit()
        return result

    return run


DUPLICATE_KEY = "duplicate key in a JSON object"


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise _DuplicateKey
    return result


def strict_json(body: bytes) -> Any:
    """JSON with each key once per object: parsers disagree on which of two copies wins (a
    proxy in front of the node may read `"to"` from the first, the node from the last), so
    the local API refuses them as the protocol does (app/crypto/encoding.py)."""
    try:
        # UTF-8 only, as the peer API (app/p2p/refusals.py parse_json says why).
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise json.JSONDecodeError("the body is not UTF-8", "", 0) from None
    try:
        return json.loads(text, object_pairs_hook=_unique_keys)
    except _DuplicateKey:
        # As FastAPI reports a body that does not decode: 422 with the reason (never the key).
        raise json.JSONDecodeError(DUPLICATE_KEY, "", 0) from None


class StrictJsonRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = strict_json(await self.body())
        return self._json


class UnitOfWorkRoute(APIRoute):
    """A route whose sync endpoint takes `session: SessionDep` commits as it returns.

    The commit comes before FastAPI validates and serialises what the route returned (its
    return annotation is the response model): a route builds that model itself, from the
    session's objects, before returning (every route here does), so the check after cannot
    turn a committed action into a 500. A generator endpoint would commit before its body
    ran: refused here."""

    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
        takes_session = "session" in inspect.signature(endpoint).parameters
        if takes_session and (
            inspect.isgeneratorfunction(endpoint) or inspect.isasyncgenfunction(endpoint)
        ):
            raise TypeError(f"{path}: a generator route cannot commit as it returns")
        if takes_session and not inspect.iscoroutinefunction(endpoint):
            endpoint = commit_on_return(endpoint)
        super().__init__(path, endpoint, **kwargs)

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        policy = _policy_of(self.dependant)
        takes_json = self.body_field is not None

        async def strict(request: Request) -> Response:
            strict_request = StrictJsonRequest(request.scope, request.receive)
            if policy is not None and request.method in BODY_METHODS:
                # FastAPI reads and parses a body before it solves any dependency, so a call
                # whose body did not parse was answered 422 with its token never looked at:
                # a revoked or guessed token, or an address blocked for its failures, went
                # unrefused, uncounted and off the record (from review). The policy runs
                # first; the route's own dependency finds the token in the cache.
                await policy(strict_request, request.app.state.node)
            if takes_json:
                _refuse_other_media(request)
            return await handler(strict_request)

        return strict


def _refuse_other_media(request: Request) -> None:
    """A JSON body sent as another type, or with none: FastAPI (its strict content type)
    hands it to the model as raw bytes, and the caller read `422 Input should be a valid
    dictionary` about a body that was one (from review). A call without a body is the
    route's to judge (a body may be optional)."""
    length = request.headers.get("content-length")
    if length in (None, "0") and "transfer-encoding" not in request.headers:
        return
    given = request.headers.get("content-type", "")
    media = given.split(";", 1)[0].strip().lower()
    kind, _, subtype = media.partition("/")
    if kind != "application" or not (subtype == "json" or subtype.endswith("+json")):
        raise UnsupportedMediaType(
            f"the body is sent as {media or 'nothing'}: send it as application/json"
        )


# The methods whose body FastAPI reads before the route's dependencies run.
BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def _policy_of(dependant: Dependant) -> Policy | None:
    """The access policy among a route's dependencies (its router's included), if any."""
    for dependency in dependant.dependencies:
        if isinstance(dependency.call, Policy):
            return dependency.call
        found = _policy_of(dependency)
        if found is not None:
            return found
    return None


_CACHE_LOCK = threading.Lock()


def token_cache(request: Request) -> TokenCache:
    """The application's cache of recently authenticated tokens (app/auth/cache.py)."""
    state = request.app.state
    cache: TokenCache | None = getattr(state, "token_cache", None)
    if cache is None:
        with _CACHE_LOCK:
            cache = getattr(state, "token_cache", None)
            if cache is None:
                cache = state.token_cache = TokenCache()
    return cache


def _bearer_token(request: Request) -> str | None:
    """The bearer token. None if the header is there but holds none (another scheme, an
    empty token): a failed authentication, counted and audited as one (api.md section 1),
    where a request without the header is only refused."""
    header = request.headers.get("authorization")
    if header is None:
        raise Unauthenticated("a bearer token is required", code="missing_token")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def source_address(request: Request) -> str:
    return request.client.host[:60] if request.client else "unknown"


class Policy:
    """Requires a valid token holding at least one of `roles`."""

    def __init__(self, *roles: Role) -> None:
        self.roles = frozenset(roles)

    async def __call__(self, request: Request, node: NodeDep) -> Principal:
        principal = await self.authenticated(request, node)
        if not principal.roles & self.roles:
            allowed = ", ".join(sorted(self.roles))
            refused = Forbidden(f"this operation requires the role {allowed}")
            await run_in_threadpool(_record_forbidden, request, node, principal, allowed)
            raise already_audited(refused)
        request.state.principal = principal
        return principal

    async def authenticated(self, request: Request, node: Node) -> Principal:
        """The token's client, whatever its roles; a refused token is answered 401 (or 429),
        counted and on record."""
        token = _bearer_token(request)
        source = source_address(request)
        if token is None:  # refused there, on record, and never let through here
            await run_in_threadpool(self._authenticate, request, node, None, source)
            raise Unauthenticated("a bearer token is required", code="missing_token")
        cache = token_cache(request)
        digest, now = hash_token(token), utc_now()
        principal = cache.get(digest, source, now)
        if principal is None:
            # The database, in the thread pool as a sync dependency would be.
            principal = await run_in_threadpool(self._authenticate, request, node, token, source)
            cache.put(digest, source, principal, now, expires_at=principal.expires_at)
        return principal

    def waived(self, node: Node) -> bool:
        """Whether the operator lifted this policy (only /metrics' can be)."""
        return False

    def _authenticate(
        self, request: Request, node: Node, token: str | None, source: str
    ) -> Principal:
        address_key = f"address:{address_unit(source)}"
        # Authentication gets its own short transaction: a refused token must not depend on
        # (or roll back) the route's unit of work. A blocked address is refused before its
        # token is looked at.
        refused: TokenRefused | None = None
        with unit_of_work(node.sessions) as session:
            retry_after = blocked_for(session, [address_key])
            if retry_after is None:
                try:
                    if token is None:
                        raise TokenRefused("a bearer token is required", code="missing_token")
                    principal = authenticate(session, token)
                except TokenRefused as exc:
                    refused = exc
        if retry_after is not None:
            raise TooManyRequests(retry_after)
        if refused is None:
            return principal
        retry_after = record_token_refused(request, node, refused, source)
        if retry_after is not None:
            raise TooManyRequests(retry_after) from refused
        raise refused


def record_token_refused(
    request: Request, node: Node, refused: TokenRefused, source: str
) -> int | None:
    """A refused token counted against its address and client, and on record as
    `auth.failed` until they are throttled; the seconds the address is now blocked for, if
    it is. At a call's start, or while it lasts (app/auth/lasting.py)."""
    # A refusal may block an address: recently trusted tokens are checked again.
    token_cache(request).clear()
    keys = [f"address:{address_unit(source)}"]
    if refused.client_id is not None:
        keys.append(f"client:{refused.client_id}")
    with unit_of_work(node.sessions) as session:
        verdict = register_refusal(
            session, keys, auth_limits(node.settings), actor=f"address:{source}"
        )
        if verdict.audit:
            # Never the token itself: only the fact, the reason and where it came from.
            record(
                session,
                actor=f"address:{source}",
                action="auth.failed",
                outcome=refused.code,
                # The route's template, never the path: the caller's own text.
                details={"route": route_of(request.scope)},
            )
    return verdict.retry_after


def _record_forbidden(request: Request, node: Node, principal: Principal, allowed: str) -> None:
    """A valid token used outside its role (an auditor reaching for request content, an
    officer for the audit log) is on record: audited until the client reaches the refusal
    limit, then counted (the next `auth.throttled` says how many) and answered 429, so no
    client can flood the log with them. Only the forbidden calls are held back: the client's
    own work goes on."""
    verdict = record_counted(
        node,
        f"forbidden:{principal.client_id}",
        actor=f"client:{principal.name}",
        action="auth.forbidden",
        outcome="forbidden",
        details={"route": route_of(request.scope), "requires": allowed},
    )
    if verdict.retry_after is not None:
        raise TooManyRequests(verdict.retry_after)


class MetricsPolicy(Policy):
    """/metrics: the policy's token (a scraper's `monitor`, or an `admin`), unless the
    operator restricts it at the proxy instead (`ENTRAIDE_METRICS_PUBLIC`). Its counters
    say when envelopes arrive, and the fact of a request is confidential (DESIGN.md 1), to
    anyone who reaches the listener peers reach: from a security review."""

    async def __call__(self, request: Request, node: NodeDep) -> Principal | None:  # type: ignore[override]  # None: no token asked for while the operator opted out
        if self.waived(node):
            return None
        return await super().__call__(request, node)

    def waived(self, node: Node) -> bool:
        return node.settings.metrics_public


class Public:
    """Marks a route that deliberately needs no token, and says why."""

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def __call__(self) -> None:
        return None


class PublicWithDetails(Public):
    """Marks a public route whose answer holds more for a token of `policy`'s roles
    (/readyz: its status for load balancers, its delivery backlog for a monitor).

    The dependency says whether to show it. Without a bearer token, no: nothing is looked
    up, written or counted, and a blocked address is answered all the same (a load
    balancer's probe never authenticates, and must never be throttled or audited). Another
    scheme, or `Bearer` alone, asks for nothing either: no token is needed here. A bearer
    token sent is authenticated as on any route: an unknown, revoked or expired one is
    answered 401, counted and on record, and 429 once its address (or client) is blocked,
    so guessing tokens here is as visible and as bounded as anywhere. A valid token without
    the roles gets the public answer, as if sent none, with nothing on record: the route is
    public, nothing was refused (a case system that sends its officer token with every call,
    as deploy/exchange.py does, must not be told its node is not ready). Where the operator
    lifted `policy`, yes, without looking at any token."""

    def __init__(self, reason: str, policy: Policy) -> None:
        super().__init__(reason)
        self.policy = policy

    async def __call__(self, request: Request, node: NodeDep) -> bool:  # type: ignore[override]  # a dependency with its own parameters
        if self.policy.waived(node):
            return True
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return False
        principal = await self.policy.authenticated(request, node)
        request.state.principal = principal
        return bool(principal.roles & self.policy.roles)


# Set in a P2P request's scope by the body limit (app/main.py), which looked for a block
# before reading the body: the route's dependency need not look again.
P2P_UNBLOCKED = "entraide.p2p_unblocked"


def p2p_blocked_for(node: Node, source: str) -> int | None:
    """Seconds an address whose envelopes keep being refused must still wait, or None. Asked
    of every P2P call: read first, written (the attempt counted) only for a blocked one."""
    key = f"p2p:{address_unit(source)}"
    with reading(node.sessions) as session:
        if not is_blocked(session, key):
            return None
    with unit_of_work(node.sessions) as session:
        return blocked_for(session, [key])


def refuse_p2p_call(node: Node, source: str, code: str, detail: str) -> bool:
    """A P2P call refused before any route's own checks (a body too large, headers too large,
    a path, method, header or query that does not parse): counted against the address, and
    audited until it is throttled, like any refused envelope. Once the address is blocked,
    nothing is written (a read only): calls that cost their sender nothing must not each
    cost a write. True if the refusal was counted: only then does it count in
    `entraide_envelopes_refused_total`, as a route's refusal stops counting there once its
    address is answered 429."""
    with read_snapshot(node.sessions) as session:
        if is_blocked(session, f"p2p:{address_unit(source)}"):
            return False
    with unit_of_work(node.sessions) as session:
        counted = record_p2p_refusal(session, node, source)
        if counted:
            record(
                session,
                actor=f"address:{source}",
                action="envelope.refused",
                outcome=code,
                details={"code": code, "detail": detail},
            )
    return counted


class PeerTransport(Public):
    """P2P routes: no token (every envelope is signed), but an address whose envelopes keep
    being refused is throttled, and with mutual TLS on, only pinned peer certificates pass."""

    def __call__(self, request: Request, node: NodeDep) -> None:  # type: ignore[override]  # a dependency with its own parameters
        source = source_address(request)
        # Both checks read only, outside the writer's turn: every P2P call asks them, and
        # each took SQLite's write lock (queued behind, and holding up, the node's writes).
        if not request.scope.get(P2P_UNBLOCKED):  # not asked already, before the body
            retry_after = p2p_blocked_for(node, source)
            if retry_after is not None:
                raise TooManyRequests(retry_after)
        refused: CertificateRefused | None = None
        if node.settings.p2p_require_client_cert:
            with reading(node.sessions) as session:
                try:
                    check_peer_certificate(session, node.settings, request.scope)
                except CertificateRefused as exc:
                    refused = exc
        if refused is not None:
            # Counted against the address like a refused envelope, and audited until it is
            # throttled: a certificate probe is an authentication failure (DESIGN.md 5).
            with unit_of_work(node.sessions) as session:
                if record_p2p_refusal(session, node, source):
                    record(
                        session,
                        actor=f"address:{source}",
                        action="peer.certificate_refused",
                        outcome=refused.code,
                        details={"detail": refused.detail},
                    )
            raise refused


def record_p2p_refusal(session: Session, node: Node, source: str) -> bool:
    """Count a refused envelope from `source`; True if it is still to be audited by itself."""
    limits = auth_limits(node.settings)
    limits = Limits(node.settings.p2p_refusal_limit, limits.window, limits.block)
    key = f"p2p:{address_unit(source)}"
    verdict = register_refusal(session, [key], limits, actor=f"address:{source}")
    return verdict.audit


PUBLIC = Public("public information: identity document, health, readiness")
PEER_SIGNED = PeerTransport("peer-to-peer: every envelope is authenticated by its signature")
OFFICER = Policy(Role.OFFICER)
AUDITOR = Policy(Role.AUDITOR)
ADMIN = Policy(Role.ADMIN)
METRICS = MetricsPolicy(Role.MONITOR, Role.ADMIN)
# The delivery backlog says when this node sends requests and how many, as the metrics do.
READINESS = PublicWithDetails(
    "readiness: its status for load balancers; the delivery backlog for whom /metrics admits",
    METRICS,
)

ANY_ROLE = Policy(Role.OFFICER, Role.AUDITOR, Role.ADMIN)

AnyRoleDep = Annotated[Principal, Depends(ANY_ROLE)]
OfficerDep = Annotated[Principal, Depends(OFFICER)]
AuditorDep = Annotated[Principal, Depends(AUDITOR)]
AdminDep = Annotated[Principal, Depends(ADMIN)]
