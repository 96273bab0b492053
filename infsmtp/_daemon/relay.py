"""
L{RelayDelivery}: an C{onReceive} handler that forwards every message to a
smarthost through a L{ClientPool} (a few sessions, reused), and answers the
client only once the smarthost has answered; L{LMTPDelivery}, the same
into a mail store that speaks LMTP (Dovecot).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from .._client.pool import ClientPool
from .._enums import AuthMode, EncryptMode
from .._errors import SMTPError, SMTPRecipientsRefused
from .._server.session import Session

log = Logger(namespace="infsmtp.relay")

#: The step of a pooled send that failed (L{SMTPError.step}), as logged.
_STEPS = {"connect": "connecting to", "authenticate": "authenticating to", "send": "sending the message to"}


class RelayDelivery:
    """
    Forward each received message to a smarthost; use it as a server's
    C{onReceive} handler::

        server.onReceive = RelayDelivery("smtp.example.org", 587,
                                         encryptMode=EncryptMode.startTls,
                                         username="me", password="secret")

    The client gets C{250} only after the smarthost accepted the message.
    A permanent refusal (5xx) is passed on as C{554} (C{550} when every
    recipient was refused) with the smarthost's reason, so the sender
    bounces at once; so is an envelope the smarthost cannot take (non-ASCII
    addresses without SMTPUTF8: C{554 5.6.7}).  Anything else (no
    connection, a timeout, a 4xx, our credentials refused) is answered
    C{451}, so the sender keeps the message and retries.  Each failure is
    logged with the step that failed (connecting, authenticating, sending).

    The smarthost's reply to the end of the message may take C{dataTimeout}
    (RFC 5321's 10 minutes by default): a smarthost scanning the message is
    not cut short.  Past it the client is answered C{451}; if the smarthost
    took the message after all, the sender's retry delivers it twice (the
    window RFC 5321 4.5.3.2.6 and RFC 1047 accept).  Keep C{dataTimeout}
    under the server's C{receiveTimeout}, which otherwise answers 451 first.

    There is no queue: recipients the smarthost refuses while it accepts
    others are logged (the message went to the others, and a 451 would
    duplicate it for them).  When the server speaks LMTP
    (C{Server(lmtp=True)}), those recipients are refused with the
    smarthost's own reply (C{session.rcptResults}) and the others get 250.

    Messages go over at most C{maxConnections} sessions to the smarthost,
    each reused for the next message (a L{ClientPool}); more messages at
    once wait their turn.  A session that ended before any of a message
    went out is replaced and the message sent once more; L{close} (when
    the server stops) ends the sessions.

    @param host: the smarthost.
    @param port: its port.
    @param endpoint: reach it through this Twisted client endpoint
        (C{"unix:/run/smtp.sock"}) instead of C{host} and C{port}; C{host}
        is then only the name TLS verifies.
    @param lmtp: speak LMTP (RFC 2033): the server answers for each
        recipient after the message, and those it refuses then are handled
        as recipients refused (logged when others took the message; C{550}
        or C{451} when none did).
    @param encryptMode: an L{EncryptMode} (STARTTLS never falls back to
        plaintext).
    @param username: authenticate with it (L{AuthMode.default}) when given.
    @param password: the password for C{username}.
    @param caCertFile: PEM trust roots for its certificate.
    @param verifyServerCertificate: check its certificate chain and name.
    @param timeout: milliseconds, for the connection and each reply.
    @param dataTimeout: milliseconds for the reply to the end of the message.
    @param maxConnections: the most sessions open to the smarthost at once.
    @param reactor: passed to L{ClientPool}.
    """

    #: How replies and logs name the server messages go to.
    _peer = "the smarthost"
    _verb = "relayed to"

    def __init__(
        self,
        host: str | None = None,
        port: int = 25,
        *,
        endpoint: str | None = None,
        lmtp: bool = False,
        encryptMode: EncryptMode = EncryptMode.none,
        username: str | None = None,
        password: str | None = None,
        caCertFile: str | None = None,
        verifyServerCertificate: bool = True,
        timeout: int = 30000,
        dataTimeout: int = 600000,
        heloName: str | None = None,
        maxConnections: int = 4,
        reactor: Any = None,
    ) -> None:
        if host is None and endpoint is None:
            raise ValueError("give the smarthost's host (and port) or an endpoint")
        self.host = host
        self.port = port
        self.endpoint = endpoint
        self.lmtp = lmtp
        self.encryptMode = EncryptMode(encryptMode)
        self.username = username
        self.password = password
        self.caCertFile = caCertFile
        self.verifyServerCertificate = verifyServerCertificate
        self.timeout = timeout
        self.dataTimeout = dataTimeout
        self.heloName = heloName
        self.maxConnections = maxConnections
        self._reactor = reactor
        self._clientPool: ClientPool | None = None

    def _pool(self) -> ClientPool:
        # Made at the first message: the attributes above may change until then.
        pool = self._clientPool
        if pool is None:
            settings: dict[str, Any] = dict(
                port=self.port,
                lmtp=self.lmtp,
                encryptMode=self.encryptMode,
                timeout=self.timeout,
                dataTimeout=self.dataTimeout,
                verifyServerCertificate=self.verifyServerCertificate,
                caCertFile=self.caCertFile,
            )
            if self.host is not None:
                settings["host"] = self.host
            if self.endpoint is not None:
                settings["endpoint"] = self.endpoint
            if self.heloName:
                settings["heloName"] = self.heloName
            if self.username:
                settings.update(authMode=AuthMode.default, username=self.username, password=self.password or "")
            pool = self._clientPool = ClientPool(self._reactor, maxConnections=self.maxConnections, **settings)
        return pool

    def close(self) -> Deferred[None]:
        """
        End the sessions to the smarthost, once the messages being forwarded
        are through; a later message opens new ones.
        """
        pool, self._clientPool = self._clientPool, None
        return succeed(None) if pool is None else pool.close()

    def __call__(self, session: Session) -> Deferred:
        """
        Forward the message; the Deferred fires with C{True} once the
        smarthost accepted it.
        """
        return Deferred.fromCoroutine(self._forward(session))

    async def _forward(self, session: Session) -> bool:
        where = self.endpoint or f"{self.host}:{self.port}"
        facts = dict(session.deliveryFacts(), smarthost=where)
        try:
            # msgFile: a spooled message is streamed, never loaded whole.  A
            # cancel (the server's receiveTimeout) closes its session.
            refused = await self._pool().sendStream(session.msgFile, session.mailFrom, list(session.rcptTo))
        except SMTPError as e:
            log.error(
                "session {sessionId} from {client}: <{sender}> -> {recipients}: "
                "{step} {smarthost} failed: {error}",
                step=_STEPS.get(e.step or "send", _STEPS["send"]),
                error=str(e),
                **facts,
            )
            raise self._reply(e) from None
        for address, (code, text) in refused.items():
            # Behind an LMTP server (Server(lmtp=True)) each recipient gets
            # its own reply: these are refused there with the peer's words.
            session.rcptResults[address] = SMTPError(code, text)
            log.warn(  # noqa: G010 (twisted.logger.Logger has warn, not warning)
                "session {sessionId}: {smarthost} refused <{address}>: {code} {text}",
                address=address,
                code=code,
                text=text,
                **facts,
            )
        log.info(
            "session {sessionId} from {client}: <{sender}> -> {recipients}, "
            "{size} bytes, TLS {tls}, {verb} {smarthost}",
            verb=self._verb,
            **facts,
        )
        return True

    def _reply(self, error: SMTPError) -> SMTPError:
        """
        What our client is told when the smarthost did not take a message.
        """
        if isinstance(error, SMTPRecipientsRefused):
            codes = {code for code, _ in error.refused.values()}
            if codes and all(500 <= code < 600 for code in codes):
                return SMTPError(550, f"Recipients refused by {self._peer}")
        elif error.code == 553 and error.text.startswith("5.6.7"):
            # Refused before it was sent: the smarthost cannot take
            # non-ASCII addresses (RFC 6531 3.6.2), today or tomorrow.
            return SMTPError(554, "5.6.7 Non-ASCII addresses cannot be relayed: the smarthost lacks SMTPUTF8")
        elif error.code is not None and 500 <= error.code < 600 and error.code != 535:
            return SMTPError(554, f"Refused by {self._peer}: {error.text}")
        if error.code is not None and 400 <= error.code < 500 and error.code != 454:
            # The smarthost's own temporary refusal: its reason helps the
            # sender's postmaster (our credentials' 454 stays ours).
            return SMTPError(451, f"Cannot forward the message now, try again later ({error.code} {error.text})")
        return SMTPError(451, "Cannot forward the message now, try again later")


class LMTPDelivery(RelayDelivery):
    """
    Deliver each received message into a mail store over LMTP (RFC 2033),
    such as Dovecot's C{lmtp} service; use it as a server's C{onReceive}
    handler::

        server.onReceive = LMTPDelivery("unix:/run/dovecot/lmtp")

    The client gets C{250} only once the store took the message for at
    least one recipient.  The store answers for each recipient: those it
    refuses while it takes the message for others are logged (there is no
    queue to bounce from, and a C{451} would deliver it twice to the
    others); when it refuses them all, the client gets C{550} if every
    refusal was permanent (unknown users), else C{451} (a full mailbox
    that may empty, the store unreachable), so the sender retries.

    @param endpoint: a Twisted client endpoint string
        (C{"unix:/run/dovecot/lmtp"}, C{"tcp:127.0.0.1:24"}).
    @param timeout: milliseconds, for the connection and each reply.
    @param dataTimeout: milliseconds for the replies to the end of the
        message.
    @param maxConnections: the most sessions open to the store at once.
    """

    _peer = "the mail store"
    _verb = "delivered over LMTP to"

    def __init__(
        self,
        endpoint: str,
        *,
        timeout: int = 30000,
        dataTimeout: int = 600000,
        heloName: str | None = None,
        maxConnections: int = 4,
        reactor: Any = None,
    ) -> None:
        super().__init__(
            endpoint=endpoint,
            lmtp=True,
            timeout=timeout,
            dataTimeout=dataTimeout,
            heloName=heloName,
            maxConnections=maxConnections,
            reactor=reactor,
        )
