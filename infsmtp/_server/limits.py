"""
Per-client limits: what one host may hold and how fast it may come back.

Postfix's anvil is the model: the server's total limits (C{maxConnections},
the memory budget) protect the machine, and these protect everyone else
from one host that opens every slot, reconnects in a loop, or guesses
passwords over many connections.  The table here is the server's memory of
the hosts it has seen lately:

- concurrent sessions per client;
- connection attempts per client per minute, as a token bucket (two
  numbers per host, whatever the rate);
- failed logins per client, as a bucket that drains over ten minutes,
  whose level also sets how long the next C{535} waits (a tarpit that
  grows with each failure, across connections).

A client is its IPv4 address, or the /64 network of its IPv6 address (one
IPv6 host holds a whole /64 and can rotate addresses within it at will).
Clients in the trusted networks are not limited.  The table is bounded:
hosts with nothing left to remember are forgotten once a minute, and past
C{MAX_TRACKED} the idle hosts seen first are forgotten first.

Nothing here touches a socket or a reactor: time comes from the C{clock}
given, so tests drive it with a L{task.Clock}.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

#: Seconds over which C{maxConnectionRate} counts (Postfix's
#: anvil_rate_time_unit).
RATE_UNIT = 60.0

#: Seconds over which a full bucket of login failures drains away.
AUTH_FAILURE_WINDOW = 600.0

#: Longest pause before a failed login's 535, in seconds.
MAX_AUTH_DELAY = 30.0

#: Hosts remembered at most (their entries are a few hundred bytes each).
MAX_TRACKED = 50_000


def parseNetworks(networks: Iterable[str]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """
    Parse CIDR strings (C{"192.0.2.0/24"}, C{"::1"}).

    @raise ValueError: one of them is not a network, with its text.
    """
    if isinstance(networks, str):
        raise ValueError(f"trusted networks must be a list of CIDR strings, not the string {networks!r}")
    parsed = []
    for text in networks:
        try:
            parsed.append(ipaddress.ip_network(str(text).strip(), strict=False))
        except ValueError as e:
            raise ValueError(f"trusted network {text!r}: {e}") from None
    return tuple(parsed)


def clientKey(ip: str) -> str:
    """
    The key a client is counted under: its IPv4 address, the /64 of its
    IPv6 address, or the text as it is (a UNIX socket's peer).
    """
    if ":" not in ip:
        return ip
    try:
        address = ipaddress.IPv6Address(ip)
    except ValueError:
        return ip
    mapped = address.ipv4_mapped
    if mapped is not None:
        return str(mapped)
    return str(ipaddress.IPv6Network((int(address) >> 64 << 64, 64)))


@dataclass(slots=True)
class _Client:
    sessions: int = 0
    #: Connection tokens left, and when they were last counted.
    tokens: float = 0.0
    tokensAt: float = 0.0
    #: Login failures not yet drained, and when they were last counted.
    failures: float = 0.0
    failuresAt: float = 0.0


class ClientLimits:
    """
    The per-client books of one server.

    @param maxSessions: concurrent sessions per client (0: no limit).
    @param maxRate: connection attempts per client per L{RATE_UNIT}
        (0: no limit).  Refused attempts count too: a client hammering the
        port stays refused until it slows down.
    @param maxAuthFailures: failed logins per client within about
        L{AUTH_FAILURE_WINDOW} after which AUTH is refused (0: no limit).
    @param authDelay: the pause before the first failed login's 535,
        doubling with each further failure of the client (0: none), up to
        L{MAX_AUTH_DELAY}.
    @param trusted: networks whose clients are not limited.
    @param clock: gives C{seconds()}.
    """

    def __init__(
        self,
        maxSessions: int,
        maxRate: int,
        maxAuthFailures: int,
        authDelay: float,
        trusted: Iterable[Any],
        clock: Any,
    ) -> None:
        self.maxSessions = maxSessions
        self.maxRate = maxRate
        self.maxAuthFailures = maxAuthFailures
        self.authDelay = authDelay
        self.trusted = tuple(trusted)
        self._seconds = clock.seconds
        # Insertion order is age: the oldest hosts are forgotten first.
        self._clients: dict[str, _Client] = {}
        self._sweptAt = self._seconds()

    @property
    def active(self) -> bool:
        """
        Whether any limit is set (if not, nothing needs counting).
        """
        return bool(self.maxSessions or self.maxRate or self.maxAuthFailures or self.authDelay)

    def isTrusted(self, ip: str) -> bool:
        if not self.trusted:
            return False
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            return False
        mapped = getattr(address, "ipv4_mapped", None)
        return any(address in network or (mapped is not None and mapped in network) for network in self.trusted)

    def _client(self, key: str) -> _Client:
        client = self._clients.get(key)
        if client is None:
            if len(self._clients) >= MAX_TRACKED:
                self._forgetIdle()
            client = self._clients[key] = _Client(tokens=float(self.maxRate), tokensAt=self._seconds())
        return client

    def _forgetIdle(self) -> None:
        """
        Make room: forget hosts with no session, oldest first.  (Hosts with
        sessions are at most C{maxConnections}.)
        """
        for key in list(self._clients):
            if len(self._clients) < MAX_TRACKED * 9 // 10:
                break
            if self._clients[key].sessions == 0:
                del self._clients[key]

    def _sweep(self) -> None:
        """
        Forget, once a minute, every host with nothing left to remember.
        """
        self._sweptAt = self._seconds()
        for key, client in list(self._clients.items()):
            self._maybeForget(key, client)

    def _maybeForget(self, key: str, client: _Client) -> None:
        """
        Forget a host once it has nothing the table must remember.
        """
        if client.sessions or self._failures(client) > 0.05:
            return
        if self.maxRate and self._tokens(client) < self.maxRate - 0.5:
            return
        self._clients.pop(key, None)

    def _tokens(self, client: _Client) -> float:
        # Refilled continuously: maxRate tokens per RATE_UNIT, never more
        # than maxRate held.  (connect() does the same inline.)
        now = self._seconds()
        client.tokens = min(
            float(self.maxRate), client.tokens + (now - client.tokensAt) * self.maxRate / RATE_UNIT
        )
        client.tokensAt = now
        return client.tokens

    def _failures(self, client: _Client) -> float:
        if not client.failures:
            return 0.0
        now = self._seconds()
        drain = (now - client.failuresAt) * max(self.maxAuthFailures, 1) / AUTH_FAILURE_WINDOW
        client.failures = max(0.0, client.failures - drain)
        client.failuresAt = now
        return client.failures

    def connect(self, ip: str) -> str | None:
        """
        A client connects: count it in, or say why not.

        @return: L{None} when admitted (L{disconnect} must follow), else
            the reason, for the 421 reply.
        """
        # Once per connection: kept to a few lookups.
        if not self.active or (self.trusted and self.isTrusted(ip)):
            return None
        now = self._seconds()
        if now - self._sweptAt > RATE_UNIT:
            self._sweep()
        client = self._clients.get(ip if ":" not in ip else clientKey(ip))
        if client is None:
            client = self._client(clientKey(ip))
        maxRate = self.maxRate
        if maxRate:
            tokens = client.tokens + (now - client.tokensAt) * maxRate / RATE_UNIT
            client.tokens = tokens if tokens < maxRate else float(maxRate)
            client.tokensAt = now
            if client.tokens < 1:
                return f"too many connections from {ip}, slow down"
            client.tokens -= 1
        if self.maxSessions and client.sessions >= self.maxSessions:
            return f"too many concurrent connections from {ip}"
        client.sessions += 1
        return None

    def disconnect(self, ip: str) -> None:
        """
        A client admitted by L{connect} is gone.
        """
        # Hosts are forgotten by the sweep, not here: once a minute rather
        # than once per connection.
        if not self.active or (self.trusted and self.isTrusted(ip)):
            return
        client = self._clients.get(ip if ":" not in ip else clientKey(ip))
        if client is not None and client.sessions > 0:
            client.sessions -= 1

    def authBlocked(self, ip: str) -> bool:
        """
        Whether the client has failed to log in too often lately.
        """
        if not self.maxAuthFailures or self.isTrusted(ip):
            return False
        client = self._clients.get(clientKey(ip))
        # Rounded, as the delay is: N failures in quick succession block.
        return client is not None and round(self._failures(client)) >= self.maxAuthFailures

    def authFailed(self, ip: str) -> float:
        """
        Count a failed login.

        @return: seconds to wait before answering it.
        """
        if self.isTrusted(ip) or not (self.maxAuthFailures or self.authDelay):
            return 0.0
        client = self._client(clientKey(ip))
        level = self._failures(client) + 1
        client.failures, client.failuresAt = level, self._seconds()
        if not self.authDelay:
            return 0.0
        # Whole doublings: the level drains continuously between failures.
        return min(MAX_AUTH_DELAY, self.authDelay * 2 ** min(round(level) - 1, 16))

    def sessionsOf(self, ip: str) -> int:
        """
        The client's live sessions, as counted.
        """
        client = self._clients.get(clientKey(ip))
        return client.sessions if client is not None else 0

    @property
    def tracked(self) -> int:
        """
        Hosts currently remembered.
        """
        return len(self._clients)


class MemoryBudget:
    """
    The bytes of message data that all sessions together may hold in
    memory.  A session's L{SpoolSink} takes from it as a message comes in
    and moves the message to a temporary file when it cannot; the bytes are
    given back when the transaction ends.  So the memory unfinished and
    waiting messages hold stays under C{limit} however many sessions stall
    in DATA.

    @ivar used: bytes currently taken.
    """

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.used = 0

    def take(self, size: int) -> bool:
        """
        Take C{size} bytes; C{False} (and nothing taken) when they would
        go over the limit.
        """
        if self.limit is not None and self.used + size > self.limit:
            return False
        self.used += size
        return True

    def give(self, size: int) -> None:
        """
        Give back bytes taken.
        """
        self.used -= size
