"""
:class:`ClientPool`: SMTP sessions to one server, kept open and shared by
many sends, and :class:`BlockingClientPool`, the same for blocking code.

A connection per message pays for a TCP handshake, TLS, EHLO and AUTH every
time, and a busy sender opening hundreds of them at once gets throttled or
blocked.  A pool opens at most ``maxConnections`` sessions, sends one
message after another on each, and retires a session once it has sent
``maxMessagesPerConnection`` messages, lived ``connectionLifetime`` seconds or
idled ``idleTimeout`` seconds (before the server's own idle timeout ends it
under us).  Sends beyond what the sessions can take wait their turn, in the
order made; ``rateLimit`` spaces them out, never drops them.

A session the server closed while it was idle is replaced before it is used.
When a send fails because the session ended (the connection was lost, or the
server said ``421``) before any byte of the message itself went out, the
message goes once more on a fresh session: the server cannot have it.  Once
the message began to go out (:attr:`SMTPError.messageStarted`), it never
goes again, since the server may have it: the failure reaches the caller,
whose retry policy (and knowledge of duplicates) it is.

One pool serves one destination: its settings are those of one
:class:`AsyncClient`.  The protocol lives in :mod:`infsmtp._client.protocol`;
the pool only decides which session sends what, and when.
"""

from __future__ import annotations

from collections import deque
from email.message import Message
from typing import IO, Any, Callable, Sequence

from twisted.internet.defer import Deferred, DeferredList, fail
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger

from .._blocking import blockingCall
from .._enums import AuthMode
from .._errors import SMTPAuthenticationError, SMTPConnectError, SMTPError
from .client import AsyncClient, BlockingSends, MailOptions, RcptOptions, Recipients, Refused, outgoingFromRaw
from .envelope import OutgoingMessage, outgoingFromMessage, outgoingFromStream

log = Logger(namespace="infsmtp.pool")

#: What a send prepares once it has its session: the message and its envelope.
Prepared = tuple[OutgoingMessage, str, list[str]]


class _Session:
    """
    One pooled session: its client, and what decides when it retires.
    """

    __slots__ = ("client", "opened", "sent", "idleSince", "idleTimer")

    def __init__(self, client: AsyncClient, opened: float) -> None:
        self.client = client
        #: When it was opened (the pool's clock), for ``connectionLifetime``.
        self.opened = opened
        #: Messages it has started to send, for ``maxMessagesPerConnection``.
        self.sent = 0
        #: Since when it has been idle, for ``noopAfter``.
        self.idleSince = opened
        self.idleTimer: IDelayedCall | None = None


def mayResend(error: BaseException) -> bool:
    """
    Whether a message whose send failed with ``error`` may go again on a
    fresh session: the session ended (lost, or closed by the server's
    ``421``) before any byte of the message went out.  A timeout is not
    retried (the server is slow, and waiting twice as long helps no one),
    nor is anything the server refused for good.
    """
    return (
        isinstance(error, SMTPError)
        and not error.messageStarted
        and (isinstance(error, SMTPConnectError) or error.code == 421)
    )


class ClientPool:
    """
    SMTP sessions to one server, opened as needed and shared by every send;
    each send method returns a Deferred of the refused recipients, as
    :class:`AsyncClient`'s do::

        async with ClientPool(host="smtp.example.org", port=587,
                              encryptMode=EncryptMode.startTls,
                              username="me@example.org", password="secret",
                              maxConnections=4) as pool:
            await gatherResults([pool.sendMail(m) for m in messages])

    Sends wait their turn in the order made; cancelling a waiting send's
    Deferred takes it out of the line, cancelling a running one closes its
    session (as :class:`AsyncClient` does).

    A failure is the one :class:`AsyncClient` gives: opening a session
    fails the send with :meth:`AsyncClient.connect`'s errors, and refused
    credentials with :class:`SMTPAuthenticationError`.  Its ``step`` says
    which step failed: ``"connect"``, ``"authenticate"`` or ``"send"``.
    A send whose session ended before any of the message went out is made
    once more on a fresh session (see :func:`mayResend`); one that failed
    later is not (:attr:`SMTPError.messageStarted`).
    """

    def __init__(
        self,
        reactor: Any = None,
        *,
        maxConnections: int = 5,
        maxMessagesPerConnection: int | None = 100,
        connectionLifetime: float | None = 300.0,
        idleTimeout: float | None = 30.0,
        noopAfter: float | None = 10.0,
        rateLimit: tuple[int, float] | None = None,
        **settings: Any,
    ) -> None:
        """
        :param reactor: the reactor for the sessions and the pool's timers;
            the global one by default.
        :param maxConnections: the most sessions open at once.
        :param maxMessagesPerConnection: a session sends at most this many
            messages, then says QUIT and a new one takes its place;
            ``None`` for no limit.
        :param connectionLifetime: seconds after which a session is retired
            once its current message is sent; ``None`` for no limit.
        :param idleTimeout: seconds after which an idle session is closed
            (keep it under the server's idle timeout); ``None`` to keep it.
        :param noopAfter: a session idle this many seconds is checked with
            ``NOOP`` before it is used, and replaced if that fails; ``None``
            never checks (a session the server closed is replaced anyway).
        :param rateLimit: ``(messages, seconds)``: at most that many sends
            start in any ``seconds``; the others wait.  ``None``: no limit.
            A message sent once more after its session failed does not
            wait again.
        :param settings: the :class:`AsyncClient` settings of each session
            (``host``, ``port``, ``encryptMode``, ``authMode``, ``username``,
            ``password``, ``timeout``, ...).  With a ``username`` and no
            ``authMode``, ``AuthMode.default``.  An unknown name raises
            ``TypeError``.
        :raises ValueError: for a limit out of range.
        """
        if not isinstance(maxConnections, int) or maxConnections < 1:
            raise ValueError(f"maxConnections must be a whole number of at least 1, not {maxConnections!r}")
        if maxMessagesPerConnection is not None and (
            not isinstance(maxMessagesPerConnection, int) or maxMessagesPerConnection < 1
        ):
            raise ValueError(
                f"maxMessagesPerConnection must be None or at least 1, not {maxMessagesPerConnection!r}"
            )
        for name, value in (("connectionLifetime", connectionLifetime), ("idleTimeout", idleTimeout)):
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be None or over 0 seconds, not {value!r}")
        if noopAfter is not None and not noopAfter >= 0:
            raise ValueError(f"noopAfter must be None or at least 0 seconds, not {noopAfter!r}")
        if rateLimit is not None:
            messages, seconds = rateLimit
            if not isinstance(messages, int) or messages < 1 or not seconds > 0:
                raise ValueError(f"rateLimit is (messages, seconds), at least 1 message over 0 seconds, not {rateLimit!r}")
        settings = dict(settings)
        if settings.get("username") and "authMode" not in settings:
            settings["authMode"] = AuthMode.default
        # Checked now (TypeError for an unknown name), not at the first send.
        AsyncClient(reactor, **settings)
        self._settings = settings
        self._reactor = reactor
        self.maxConnections = maxConnections
        self.maxMessagesPerConnection = maxMessagesPerConnection
        self.connectionLifetime = connectionLifetime
        self.idleTimeout = idleTimeout
        self.noopAfter = noopAfter
        self.rateLimit = rateLimit
        # Idle sessions, the most recently used last (taken first, so that
        # the others idle out when fewer are needed).
        self._idle: list[_Session] = []
        # Sessions handed to a send (opening, checked, or sending): with the
        # idle ones, never more than maxConnections.
        self._busy = 0
        # Sends waiting for a session, in order.
        self._waiting: deque[Deferred[_Session | None]] = deque()
        self._dispatching = False
        # When the last rateLimit[0] sends started.
        self._starts: deque[float] = deque()
        self._rateTimer: IDelayedCall | None = None
        # Sessions saying goodbye.
        self._closing: set[Deferred[None]] = set()
        # close() waiting for the running sends.
        self._drained: list[Deferred[None]] = []
        self._closed = False

    def _clock(self) -> Any:
        reactor = self._reactor
        if reactor is None:
            from twisted.internet import reactor  # type: ignore[no-redef]
        return reactor

    # The send API ----------------------------------------------------------

    def sendMail(
        self,
        message: Message,
        sender: str | None = None,
        recipients: Recipients = None,
        *,
        mailOptions: MailOptions = (),
        rcptOptions: RcptOptions = (),
    ) -> Deferred[Refused]:
        """
        Send an :class:`email.message.Message`, as
        :meth:`AsyncClient.sendMail` does.
        """
        return self._send(lambda: outgoingFromMessage(message, sender, recipients), mailOptions, rcptOptions)

    def sendStream(
        self,
        stream: IO[bytes] | IO[str],
        sender: str | None = None,
        recipients: Recipients = None,
        *,
        mailOptions: MailOptions = (),
        rcptOptions: RcptOptions = (),
    ) -> Deferred[Refused]:
        """
        Send the message read from ``stream``, as
        :meth:`AsyncClient.sendStream` does; it is read once a session is
        free, and not closed.
        """
        return self._send(lambda: outgoingFromStream(stream, sender, recipients), mailOptions, rcptOptions)

    def sendFile(
        self,
        fileName: str,
        sender: str | None = None,
        recipients: Recipients = None,
        *,
        mailOptions: MailOptions = (),
        rcptOptions: RcptOptions = (),
    ) -> Deferred[Refused]:
        """
        Send the message in file ``fileName``, as :meth:`AsyncClient.sendFile`
        does; it is opened once a session is free.
        """
        opened: list[IO[bytes]] = []

        def prepare() -> Prepared:
            try:
                stream = open(fileName, "rb")
            except OSError as e:
                raise SMTPError(f"cannot read {fileName!r}: {e.strerror}") from None
            opened.append(stream)
            return outgoingFromStream(stream, sender, recipients)

        def close(result: Any) -> Any:
            for stream in opened:
                stream.close()
            return result

        return self._send(prepare, mailOptions, rcptOptions).addBoth(close)

    #: The reference's name for :meth:`sendFile`.
    send = sendFile

    def sendmail(
        self,
        sender: str,
        recipients: Sequence[str] | str,
        message: bytes | str | IO[bytes],
        mailOptions: MailOptions = (),
        rcptOptions: RcptOptions = (),
    ) -> Deferred[Refused]:
        """
        smtplib's ``sendmail``, as :meth:`AsyncClient.sendmail` does.
        """
        return self._send(lambda: outgoingFromRaw(sender, recipients, message), mailOptions, rcptOptions)

    def _send(
        self, prepare: Callable[[], Prepared], mailOptions: MailOptions = (), rcptOptions: RcptOptions = ()
    ) -> Deferred[Refused]:
        if self._closed:
            return fail(SMTPError("the pool is closed: create a new one"))
        return Deferred.fromCoroutine(self._deliver(prepare, mailOptions, rcptOptions))

    async def _deliver(
        self, prepare: Callable[[], Prepared], mailOptions: MailOptions, rcptOptions: RcptOptions
    ) -> Refused:
        session = await self._acquire()
        try:
            message, sender, recipients = prepare()
        except BaseException:
            self._release(session, reusable=True)
            raise
        retried = False
        while True:
            session.sent += 1
            try:
                refused = await session.client._sendPrepared(sender, recipients, message, mailOptions, rcptOptions)
            except SMTPError as e:
                e.step = e.step or "send"
                if retried or not mayResend(e):
                    self._release(session, reusable=e.code != 421)
                    raise
                # Nothing of the message went out (its head is still in
                # `message`, the rest of its stream unread): a fresh session
                # in the same place, without waiting in line again.
                log.info(
                    "{where}: the session ended before the message went out ({error}); "
                    "sending it again on a new one",
                    where=self._where(),
                    error=str(e),
                )
                self._retire(session)
                retried = True
                session = await self._open()
                continue
            except BaseException:
                # Cancelled: AsyncClient has closed the session already.
                self._release(session, reusable=False)
                raise
            self._release(session, reusable=True)
            return refused

    def _where(self) -> str:
        settings = self._settings
        return str(
            settings.get("endpoint")
            or settings.get("socketPath")
            or f"{settings.get('host', AsyncClient.host)}:{settings.get('port', AsyncClient.port)}"
        )

    # Sessions --------------------------------------------------------------

    async def _acquire(self) -> _Session:
        """
        Wait for a turn, then a session that is ready to send: an idle one
        still alive, or a new one.
        """
        waiter: Deferred[_Session | None] = Deferred(self._waiting.remove)
        self._waiting.append(waiter)
        self._dispatch()
        session = await waiter
        if session is not None:
            try:
                alive = await self._alive(session)
            except BaseException:
                # Cancelled during its NOOP.
                self._retire(session)
                self._freeSlot()
                raise
            if alive:
                return session
            self._retire(session)
        return await self._open()

    async def _alive(self, session: _Session) -> bool:
        client = session.client
        if not client.connected:
            # Typically closed by the server's idle timeout, with a 421.
            return False
        clock = self._clock()
        if self.connectionLifetime is not None and clock.seconds() - session.opened >= self.connectionLifetime:
            return False
        if self.noopAfter is not None and clock.seconds() - session.idleSince >= self.noopAfter:
            try:
                await client.noop()
            except SMTPError:
                return False
        return True

    async def _open(self) -> _Session:
        """
        A new session, connected and authenticated, in a slot already
        taken; the slot is given back when that fails.
        """
        client = AsyncClient(self._reactor, **self._settings)
        step = "connect"
        try:
            await client.connect()
            step = "authenticate"
            if not await client.authenticate():
                raise SMTPAuthenticationError(535, f"the server refused the credentials of {client.username!r}")
        except BaseException as e:
            if isinstance(e, SMTPError):
                e.step = step
            self._track(client.disconnect().addBoth(lambda _: client.free()))
            self._freeSlot()
            raise
        return _Session(client, self._clock().seconds())

    def _release(self, session: _Session, reusable: bool) -> None:
        """
        A send is done with ``session``: keep it for the next one when it
        can go on, else retire it; either way its slot is free.
        """
        if reusable and self._canGoOn(session):
            self._keepIdle(session)
        else:
            self._retire(session)
        self._freeSlot()

    def _canGoOn(self, session: _Session) -> bool:
        if self._closed or not session.client.connected:
            return False
        limit = self.maxMessagesPerConnection
        if limit is not None and session.sent >= limit:
            return False
        lifetime = self.connectionLifetime
        return lifetime is None or self._clock().seconds() - session.opened < lifetime

    def _keepIdle(self, session: _Session) -> None:
        clock = self._clock()
        now = session.idleSince = clock.seconds()
        # Closed when idle too long, or when its lifetime ends while idle.
        limits = [self.idleTimeout] if self.idleTimeout is not None else []
        if self.connectionLifetime is not None:
            limits.append(session.opened + self.connectionLifetime - now)
        if limits:
            session.idleTimer = clock.callLater(max(0, min(limits)), self._idledOut, session)
        self._idle.append(session)

    def _idledOut(self, session: _Session) -> None:
        session.idleTimer = None
        if session in self._idle:
            self._idle.remove(session)
            self._retire(session)
            self._dispatch()

    def _retire(self, session: _Session) -> None:
        """
        Say QUIT to ``session`` and close it, in the background.
        """
        timer, session.idleTimer = session.idleTimer, None
        if timer is not None and timer.active():
            timer.cancel()
        client = session.client
        # disconnect() never fails; QUIT does nothing on a closed session.
        self._track(client.disconnect().addBoth(lambda _: client.free()))

    def _track(self, goodbye: Deferred[Any]) -> None:
        if goodbye.called:
            return
        self._closing.add(goodbye)
        goodbye.addBoth(lambda _: self._closing.discard(goodbye))

    def _freeSlot(self) -> None:
        self._busy -= 1
        self._dispatch()
        if not self._busy:
            drained, self._drained = self._drained, []
            for waiter in drained:
                waiter.callback(None)

    def _dispatch(self) -> None:
        """
        Give free sessions (or room for new ones) to waiting sends, first
        come first served, as fast as :attr:`rateLimit` allows.
        """
        if self._dispatching:
            # Called back from a send this loop started: the loop goes on.
            return
        self._dispatching = True
        try:
            waiting, idle = self._waiting, self._idle
            while waiting and (idle or self._busy + len(idle) < self.maxConnections):
                delay = self._rateDelay()
                if delay > 0:
                    if self._rateTimer is None:
                        self._rateTimer = self._clock().callLater(delay, self._rateAllows)
                    return
                session = idle.pop() if idle else None
                if session is not None and session.idleTimer is not None:
                    session.idleTimer.cancel()
                    session.idleTimer = None
                if self.rateLimit is not None:
                    self._starts.append(self._clock().seconds())
                self._busy += 1
                waiting.popleft().callback(session)
        finally:
            self._dispatching = False

    def _rateDelay(self) -> float:
        """
        Seconds until one more send may start, as :attr:`rateLimit` says.
        """
        if self.rateLimit is None:
            return 0
        messages, seconds = self.rateLimit
        starts, now = self._starts, self._clock().seconds()
        while starts and starts[0] <= now - seconds:
            starts.popleft()
        if len(starts) < messages:
            return 0
        return starts[0] + seconds - now

    def _rateAllows(self) -> None:
        self._rateTimer = None
        self._dispatch()

    # Closing ---------------------------------------------------------------

    def close(self) -> Deferred[None]:
        """
        Close the pool: sends still waiting fail with :class:`SMTPError`,
        as do new ones; running sends finish, then every session says QUIT.
        The Deferred fires once all are closed.
        """
        if not self._closed:
            self._closed = True
            if self._rateTimer is not None:
                self._rateTimer.cancel()
                self._rateTimer = None
            waiting, self._waiting = self._waiting, deque()
            for waiter in waiting:
                waiter.errback(SMTPError("the pool was closed before the message could be sent"))
            idle, self._idle = self._idle, []
            for session in idle:
                self._retire(session)
        return Deferred.fromCoroutine(self._closeAll())

    async def _closeAll(self) -> None:
        if self._busy:
            drained: Deferred[None] = Deferred()
            self._drained.append(drained)
            await drained
        await DeferredList(list(self._closing))

    async def __aenter__(self) -> ClientPool:
        """
        ``async with ClientPool(...) as pool:`` closes the pool when the
        block ends.
        """
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


class BlockingClientPool(BlockingSends):
    """
    :class:`ClientPool` for blocking code: each method waits for its
    counterpart, which runs in the reactor thread (started by crochet on
    first use, or the application's own after ``crochet.no_setup()``).
    Several threads may send through one pool at once::

        with BlockingClientPool(host="smtp.example.org", maxConnections=4) as pool:
            with ThreadPoolExecutor(8) as workers:
                list(workers.map(pool.sendMail, messages))

    A call made in the reactor thread itself raises :class:`SMTPError`:
    use :class:`ClientPool` there.
    """

    def __init__(self, **settings: Any) -> None:
        """
        :param settings: as for :class:`ClientPool` (its limits and the
            :class:`AsyncClient` settings).
        """
        self._pool = ClientPool(**settings)

    def _call(self, name: str, *args: Any, **options: Any) -> Any:
        return blockingCall(
            f"BlockingClientPool.{name}()", f"ClientPool.{name}()", getattr(self._pool, name), *args, **options
        )

    def close(self) -> None:
        """
        See :meth:`ClientPool.close`.
        """
        pool = self._pool
        if pool._busy or pool._idle or pool._closing:
            self._call("close")
        else:
            # Nothing open, so nothing for the reactor thread to do (and no
            # reason to start one).
            pool.close()

    def __enter__(self) -> BlockingClientPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
