"""
The SMTP client: :class:`AsyncClient`, whose methods return Deferreds, and
:class:`Client`, the same client for ordinary blocking code.

Both follow the reference's steps::

    client = Client()
    client.host, client.port = "smtp.example.org", 465
    client.encryptMode = Client.encryptMode.sslTls
    client.authMode = Client.authMode.default
    client.username, client.password = "me@example.org", "secret"
    with client:
        client.connect()
        client.authenticate()
        client.send("mail.eml")
        client.disconnect()

The protocol lives in :mod:`infsmtp._client.protocol`, the TLS settings in
:mod:`infsmtp._client.tls` and the envelope rules in :mod:`infsmtp._client.envelope`.
"""

from __future__ import annotations

import io
from email.message import Message
from types import MappingProxyType
from typing import IO, Any, Awaitable, Callable, Mapping, Sequence, TypeVar

from twisted.internet import error as netError
from twisted.internet.defer import CancelledError, Deferred, DeferredLock, TimeoutError, fail, succeed
from twisted.internet.endpoints import HostnameEndpoint, UNIXClientEndpoint, clientFromString, wrapClientTLS
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.mail.smtp import DNSNAME
from twisted.python.failure import Failure

from .._blocking import blockingCall
from .._enums import AuthMode, EncryptMode, EnumAttribute, TLSVersion
from .._errors import SMTPAuthenticationError, SMTPConnectError, SMTPError, SMTPTimeoutError
from .envelope import OutgoingMessage, outgoingFromMessage, outgoingFromStream
from .oauth import BearerTokens
from .protocol import ESMTPSessionClient, heloArgument
from .tls import connectionCreatorFor, negotiatedVersion

T = TypeVar("T")

Recipients = Sequence[str] | str | None
#: ESMTP parameters for MAIL (``"RET=HDRS"``).
MailOptions = Sequence[str]
#: ESMTP parameters for every RCPT, or recipient -> its own.
RcptOptions = Sequence[str] | Mapping[str, Sequence[str]]
Refused = dict[str, tuple[int, str]]

#: AuthMode.default: username and password, PLAIN preferred.
DEFAULT_MECHANISMS = ("PLAIN", "LOGIN")


class AsyncClient:
    """
    An SMTP client whose every method returns a Deferred (``await`` it in a
    coroutine, or add callbacks).  Set the attributes, then :meth:`connect`.

    Calls on one client run one after the other, in the order made, so
    several ``send`` calls may be started at once.

    :ivar host: server name or address; also the name TLS verifies unless
        :attr:`serverHostname` is set.
    :ivar port: server port.
    :ivar encryptMode: an :class:`EncryptMode`.  ``opportunistic`` uses
        STARTTLS when the server offers it and plaintext when it does not
        (see :attr:`secure`); a STARTTLS that fails, or a certificate that
        does not verify, is still an :class:`SMTPTLSError`.  Like Postfix's
        ``may``, without verification, is ``opportunistic`` with
        :attr:`verifyServerCertificate` ``False``: an explicit choice.
    :ivar authMode: an :class:`AuthMode`.
    :ivar username: for authentication.
    :ivar password: for authentication (the bearer token for ``XOAUTH2``
        and ``OAUTHBEARER`` when there is no :attr:`tokenProvider`).
    :ivar tokenProvider: where ``XOAUTH2`` and ``OAUTHBEARER`` get their
        OAuth 2.0 bearer token: called as ``tokenProvider(username,
        refresh)``, it returns the token (a ``str``), a Deferred of it or a
        coroutine.  ``refresh`` is ``False`` at first; when the server
        refuses the token (535) it is called again with ``True`` (give a
        new token, not a cached one) and the mechanism is tried once more;
        a second refusal makes :meth:`authenticate` return ``False``.
        Needs ``authMode = AuthMode.sasl`` with ``"XOAUTH2"`` or
        ``"OAUTHBEARER"`` in :attr:`saslMechanisms`.  A provider that
        raises, or returns anything but a non-empty RFC 6750 token, fails
        :meth:`authenticate` with :class:`SMTPAuthenticationError`.  Tokens
        never appear in errors.
    :ivar timeout: milliseconds, for the connect and for each reply.
    :ivar dataTimeout: milliseconds for the reply to the end of a message:
        10 minutes by default, as RFC 5321 (4.5.3.2.6) says, since the
        server may be scanning the message.  When it lapses the send fails
        with :class:`SMTPTimeoutError`, and the server may still have
        delivered the message: resending it may deliver it twice.
    :ivar sourceAddress: the local address to connect from: a host
        (``"192.0.2.7"``) or ``(host, port)``; ``None`` lets the system
        choose.
    :ivar socketPath: connect to this unix socket instead of
        :attr:`host` and :attr:`port`.
    :ivar endpoint: connect through this Twisted client endpoint instead:
        a string (``"unix:path=/run/smtp.sock"``,
        ``"tcp6:host=::1:port=25:bindAddress=::1"``) or an
        ``IStreamClientEndpoint``.  :attr:`host` remains the name TLS
        verifies.
    :ivar serverHostname: the name TLS verifies in the server's
        certificate and sends by SNI, instead of :attr:`host` (connecting
        by address or through a tunnel); also the ``host`` that
        ``OAUTHBEARER`` sends.  ``None``: :attr:`host`.
    :ivar verifyServerCertificate: check the chain and the host name.
    :ivar useLegacyServerConnect: set OpenSSL's
        ``SSL_OP_LEGACY_SERVER_CONNECT``.
    :ivar allowUnsafeLegacyRenegotiation: set OpenSSL's
        ``SSL_OP_ALLOW_UNSAFE_LEGACY_RENEGOTIATION``.
    :ivar caCertFile: PEM trust roots instead of the system's.
    :ivar certFile: the client's certificate (PEM, its chain after it),
        for servers that ask for one.
    :ivar keyFile: its private key (PEM, unencrypted); ``None`` when it is
        in :attr:`certFile`.  Both are read at :meth:`connect`, before
        connecting: an unreadable file, no certificate or key, or a key
        that does not match is an :class:`SMTPTLSError`.
    :ivar debug: log the session's transcript, every line to and from the
        server (``twisted.logger``, namespace ``infsmtp.client``, debug
        level), with AUTH secrets replaced by ``***`` and message data by
        its size; like smtplib's ``set_debuglevel(1)``.  Read at
        :meth:`connect`.
    :ivar minProtocol: the oldest TLS version accepted (a
        :class:`TLSVersion`, ``tls1_2`` by default).
    :ivar maxProtocol: the newest TLS version offered (``tls1_3`` by
        default); below :attr:`minProtocol` is an :class:`SMTPTLSError`.
    :ivar tlsConnectionCreator: an ``IOpenSSLClientConnectionCreator`` of
        your own (``twisted.internet.ssl.optionsForClientTLS(...)``), used
        as is for TLS.  It decides everything TLS does, so setting it
        together with :attr:`caCertFile`, :attr:`certFile`,
        :attr:`keyFile`, :attr:`minProtocol`, :attr:`maxProtocol`, the
        legacy options or ``verifyServerCertificate = False`` is an
        :class:`SMTPTLSError` rather than a setting silently ignored.
    :ivar heloName: the name sent in EHLO (also :attr:`localHostname`).
    :ivar saslMechanisms: order of preference for ``AuthMode.sasl``.
    :ivar lmtp: speak LMTP (RFC 2033), to deliver into a mail store such
        as Dovecot (``socketPath="/run/dovecot/lmtp"``): LHLO instead of
        EHLO, and the server answers the end of each message once per
        recipient, so a recipient it refuses then (a full mailbox) is among
        the refused that a send returns.
    :ivar chunking: send messages with BDAT (RFC 3030) when the server
        offers CHUNKING and PIPELINING: no dot-stuffing, and a message read
        whole goes out with its envelope, one round trip instead of two.
        ``False`` always uses DATA.

    A call's Deferred may be cancelled (``d.cancel()``, ``d.addTimeout()``):
    the connection is then closed at once, since the replies still to come
    would belong to the cancelled commands; :meth:`connect` again to go on.
    """

    encryptMode = EnumAttribute(EncryptMode, EncryptMode.none)
    authMode = EnumAttribute(AuthMode, AuthMode.none)
    host: str = "localhost"
    port: int = 25
    username: str = ""
    password: str = ""
    timeout: int = 30000
    dataTimeout: int = 600000
    sourceAddress: str | tuple[str, int] | None = None
    socketPath: str | None = None
    endpoint: str | IStreamClientEndpoint | None = None
    verifyServerCertificate: bool = True
    useLegacyServerConnect: bool = False
    allowUnsafeLegacyRenegotiation: bool = False
    caCertFile: str | None = None
    heloName: str = DNSNAME.decode("ascii", "replace")
    saslMechanisms: Sequence[str] = ("CRAM-MD5", "PLAIN", "LOGIN")
    serverHostname: str | None = None
    certFile: str | None = None
    keyFile: str | None = None
    minProtocol = EnumAttribute(TLSVersion, TLSVersion.tls1_2)
    maxProtocol = EnumAttribute(TLSVersion, TLSVersion.tls1_3)
    tlsConnectionCreator: Any = None
    lmtp: bool = False
    chunking: bool = True
    tokenProvider: Callable[[str, bool], Any] | None = None
    debug: bool = False

    def __init__(self, reactor: Any = None, **settings: Any) -> None:
        """
        :param reactor: the reactor to use; the global one by default.
        :param settings: attributes to set, by their names
            (``AsyncClient(host="smtp.example.org", port=587,
            encryptMode=EncryptMode.startTls)``); an unknown name raises
            ``TypeError``.
        """
        _applySettings(self, type(self), settings)
        self._reactor = reactor
        self._protocol: ESMTPSessionClient | None = None
        self._freed = False
        # One operation at a time: replies are matched to commands in order.
        self._lock = DeferredLock()

    @property
    def connected(self) -> bool:
        """
        Whether a session is open.
        """
        return self._protocol is not None and self._protocol.connected

    @property
    def localHostname(self) -> str:
        """
        smtplib's and aiosmtplib's name for :attr:`heloName`.
        """
        return self.heloName

    @localHostname.setter
    def localHostname(self, name: str) -> None:
        self.heloName = name

    @property
    def esmtpFeatures(self) -> Mapping[str, str]:
        """
        The service extensions of the server's last EHLO reply, read-only:
        keyword (upper case) -> its parameters (``{"SIZE": "10240000",
        "AUTH": "PLAIN LOGIN", "PIPELINING": ""}``); empty when not connected
        or after HELO.
        """
        protocol = self._protocol
        return MappingProxyType(protocol.extensions if protocol is not None else {})

    def supportsExtension(self, name: str) -> bool:
        """
        Whether the server's last EHLO reply announced extension ``name``
        (any case): ``client.supportsExtension("smtputf8")``.
        """
        return name.upper() in self.esmtpFeatures

    @property
    def secure(self) -> bool:
        """
        Whether the session is encrypted (after :meth:`connect` with
        ``opportunistic``, whether the server offered STARTTLS); ``False``
        when not connected.
        """
        return self.tlsVersion is not None

    @property
    def tlsVersion(self) -> str | None:
        """
        The TLS version protecting the session (``"TLSv1.3"``), or ``None``
        when it is plaintext or not connected.
        """
        protocol = self._protocol
        if protocol is None or not protocol.connected:
            return None
        return negotiatedVersion(protocol.transport)

    def _run(self, operation: Callable[..., Awaitable[T] | Deferred[T]], *args: Any) -> Deferred[T]:
        def start() -> Deferred[T]:
            if self._freed:
                raise SMTPError("the client was freed; create a new one")
            started = operation(*args)
            if isinstance(started, Deferred):
                return started
            return Deferred.fromCoroutine(started)  # type: ignore[arg-type]

        lock = self._lock
        if lock.locked:
            return lock.run(lambda: start().addErrback(self._abortIfCancelled))
        # Nothing in flight: what DeferredLock.run does, without the
        # Deferreds it takes to get there.
        lock.locked = True
        try:
            result = start()
        except BaseException:
            lock.release()
            return fail()
        return result.addCallbacks(self._release, self._failed)

    def _release(self, result: T) -> T:
        self._lock.release()
        return result

    def _failed(self, failure: Failure) -> Failure:
        self._abortIfCancelled(failure)
        self._lock.release()
        return failure

    def _abortIfCancelled(self, failure: Failure) -> Failure:
        # A cancelled call leaves replies on their way to commands nobody
        # waits for: the session cannot go on, so it ends now rather than
        # with a QUIT that waits for them.
        if failure.check(CancelledError):
            protocol, self._protocol = self._protocol, None
            if protocol is not None:
                protocol.abort()
        return failure

    def _session(self) -> ESMTPSessionClient:
        protocol = self._protocol
        if protocol is None:
            raise SMTPError("not connected: call connect() first")
        if not protocol.connected:
            # Say why, e.g. the server's 421 when it closed an idle session.
            why = protocol.closeReason
            raise SMTPConnectError(
                why.code if why else None,
                f"the connection is closed ({why.text if why else 'no reason given'}); "
                "call connect() again",
            )
        return protocol

    def connect(self) -> Deferred[None]:
        """
        Connect, read the greeting, send EHLO (HELO if EHLO is refused), and
        for ``startTls`` (for ``opportunistic``, when the server offers it)
        STARTTLS and EHLO again.

        :raises SMTPConnectError: when the connection fails or the server
            refuses the session.
        :raises SMTPTimeoutError: when the connection or a reply takes longer
            than :attr:`timeout`.
        :raises SMTPTLSError: on a bad certificate, a failed handshake, or no
            STARTTLS offered for ``startTls`` (never falls back to plaintext);
            before connecting, when a TLS setting is unusable (a
            certificate or key file, the protocol range, a
            :attr:`tlsConnectionCreator` with other TLS settings).
        :raises SMTPProtocolError: when the server's replies are malformed or
            over the client's limits (see :mod:`infsmtp._client.protocol`).
        :raises SMTPError: when :attr:`heloName` is empty or holds a space or
            a control character.
        """
        return self._run(self._connect)

    async def _connect(self) -> None:
        if self.connected:
            raise SMTPError("already connected: call disconnect() first")
        heloName = self.heloName
        # Checked before connecting: a bad name is the caller's mistake, not
        # a connection failure, and nothing goes on the wire.
        heloArgument(heloName)
        reactor = self._reactor
        if reactor is None:
            from twisted.internet import reactor  # type: ignore[no-redef]
        seconds = self.timeout / 1000
        mode = self.encryptMode
        # Built (files read, settings checked) before connecting.
        tls = connectionCreatorFor(self) if mode != EncryptMode.none else None
        endpoint, where = self._endpoint(reactor, seconds)
        if mode == EncryptMode.sslTls:
            endpoint = wrapClientTLS(tls, endpoint)
        dataSeconds = self.dataTimeout / 1000
        lmtp, chunking = self.lmtp, self.chunking
        for name, value in (("lmtp", lmtp), ("chunking", chunking)):
            if not isinstance(value, bool):
                raise SMTPError(f"{name} must be True or False, not {value!r}")
        factory = Factory.forProtocol(
            lambda: ESMTPSessionClient(heloName, seconds, dataSeconds, lmtp=lmtp, chunking=chunking)
        )
        # No "Starting factory" / "Stopping factory" log lines for every
        # connection (a relay makes one per message).
        factory.noisy = False
        debug = self.debug
        if debug:
            from .debug import TranscriptFactory

            factory = TranscriptFactory(factory, where)
        attempt = endpoint.connect(factory)
        # The endpoint's own timeout does not cover name resolution.
        attempt.addTimeout(seconds, reactor)
        try:
            protocol = await attempt
        except (CancelledError, netError.ConnectingCancelledError):
            # The caller's: the endpoint has given up already.
            raise CancelledError() from None
        except (TimeoutError, netError.TimeoutError):
            raise SMTPTimeoutError(f"connecting to {where} took over {seconds:g} seconds") from None
        except (netError.ConnectError, netError.DNSLookupError, OSError) as e:
            raise SMTPConnectError(f"cannot connect to {where}: {e}") from None
        if debug:
            protocol = protocol.wrappedProtocol
        self._protocol = protocol
        try:
            await protocol.whenGreeted()
            await protocol.ehlo()
            if mode == EncryptMode.startTls or (
                # Only what the server offers decides: a STARTTLS that fails
                # raises, as for startTls.
                mode == EncryptMode.opportunistic and "STARTTLS" in protocol.extensions
            ):
                await protocol.startTLS(tls)
        except CancelledError:
            # At once: a QUIT would wait for the replies still due.
            self._protocol = None
            await protocol.abort()
            raise
        except BaseException:
            # Say goodbye when the session is still sound (a refused greeting,
            # no STARTTLS), then make sure the connection is gone.
            self._protocol = None
            await protocol.quit()
            raise

    def _endpoint(self, reactor: Any, seconds: float) -> tuple[IStreamClientEndpoint, str]:
        """
        The endpoint to connect through, and how errors name it.
        """
        endpoint, path, source = self.endpoint, self.socketPath, self.sourceAddress
        if endpoint is not None or path is not None:
            if endpoint is not None and path is not None:
                raise SMTPError("set socketPath or endpoint, not both")
            if source is not None:
                raise SMTPError(
                    "sourceAddress applies to host and port; with an endpoint string, "
                    "give its bindAddress instead"
                )
        if path is not None:
            return UNIXClientEndpoint(reactor, path, timeout=seconds), path
        if isinstance(endpoint, str):
            try:
                return clientFromString(reactor, endpoint), endpoint
            except (ValueError, KeyError, TypeError) as e:
                raise SMTPError(f"endpoint {endpoint!r} is not a client endpoint string: {e}") from None
        if endpoint is not None:
            if not IStreamClientEndpoint.providedBy(endpoint):
                raise SMTPError(f"endpoint must be a string or an IStreamClientEndpoint, not {endpoint!r}")
            return endpoint, repr(endpoint)
        bindAddress = None
        if source is not None:
            bindAddress = (source, 0) if isinstance(source, str) else (source[0], int(source[1]))
        endpoint = HostnameEndpoint(reactor, self.host, self.port, timeout=seconds, bindAddress=bindAddress)
        return endpoint, f"{self.host}:{self.port}"

    def authenticate(self) -> Deferred[bool]:
        """
        Authenticate as :attr:`authMode` says: nothing for ``none``; PLAIN,
        else LOGIN for ``default``; the first of :attr:`saslMechanisms` the
        server offers for ``sasl``, falling back to the next when the server
        refuses a mechanism for a reason other than bad credentials.
        ``XOAUTH2`` and ``OAUTHBEARER`` take their token from
        :attr:`tokenProvider` (asked once more after a refusal), else
        :attr:`password`.

        :returns: ``True`` when the server accepted the credentials (at once
            for ``AuthMode.none``), ``False`` when it refused them (535).
        :raises SMTPAuthenticationError: when no usable mechanism is offered,
            or :attr:`username` or :attr:`password` holds a control character
            (checked before anything is sent); when :attr:`tokenProvider`
            fails, gives something that is not a token, or is set without
            ``AuthMode.sasl`` and a bearer mechanism.
        """
        return self._run(self._authenticate)

    async def _authenticate(self) -> bool:
        mode = self.authMode
        if mode == AuthMode.none:
            return True
        mechanisms = DEFAULT_MECHANISMS if mode == AuthMode.default else self.saslMechanisms
        tokens = BearerTokens(
            self.username, self.password, self.tokenProvider, self.serverHostname or self.host, mechanisms
        )
        return await self._session().authenticate(mechanisms, self.username, self.password, tokens)

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
        Send the message in file ``fileName``, streaming it.

        The envelope comes from the headers unless given: the sender from
        ``Sender`` or ``From``, the recipients from ``To``, ``Cc`` and ``Bcc``
        (the ``Resent-`` fields when the message was resent).  ``Bcc`` and
        ``Resent-Bcc`` are never transmitted.  PIPELINING, SIZE, 8BITMIME and
        SMTPUTF8 are used when the server offers them, CHUNKING too (see
        :attr:`chunking`).

        :param mailOptions: ESMTP parameters for MAIL (DSN's
            ``"RET=HDRS"``, ``"ENVID=x1"``; ``"REQUIRETLS"``, which RFC 8689
            lets go only over TLS to a server that offers it); one naming
            ``SIZE``, ``BODY`` or ``SMTPUTF8`` replaces the client's own.
        :param rcptOptions: ESMTP parameters for every RCPT
            (``"NOTIFY=SUCCESS,FAILURE"``), or a mapping of recipient -> its
            own (``{"bob@example.org": ["NOTIFY=NEVER"]}``).
        :returns: the refused recipients, address -> (code, text); empty
            when all were accepted.
        :raises SMTPRecipientsRefused: when every recipient was refused.
        :raises SMTPError: when the message was refused; before anything is
            sent, when an address is empty (a recipient) or holds a space,
            ``<``, ``>`` or a control character, which would inject
            parameters or commands.  A failure that came once the message
            itself began to go out has ``messageStarted`` set: the server
            may have it, and sending it again may deliver it twice.
        """
        return self._run(self._sendFile, fileName, sender, recipients, mailOptions, rcptOptions)

    def _sendFile(
        self,
        fileName: str,
        sender: str | None,
        recipients: Recipients,
        mailOptions: MailOptions = (),
        rcptOptions: RcptOptions = (),
    ) -> Deferred[Refused]:
        self._session()
        try:
            stream = open(fileName, "rb")
        except OSError as e:
            raise SMTPError(f"cannot read {fileName!r}: {e.strerror}") from None
        try:
            sent = self._sendStream(stream, sender, recipients, mailOptions, rcptOptions)
        except BaseException:
            stream.close()
            raise

        def close(result: T) -> T:
            stream.close()
            return result

        return sent.addBoth(close)

    #: The reference's name for :meth:`sendFile`.
    send = sendFile

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
        Send the message read from ``stream`` (binary, or text sent as
        UTF-8), streaming it, as :meth:`sendFile` does.  The stream is read
        in the reactor thread and not closed.
        """
        return self._run(self._sendStream, stream, sender, recipients, mailOptions, rcptOptions)

    def _sendStream(
        self,
        stream: IO[Any],
        sender: str | None,
        recipients: Recipients,
        mailOptions: MailOptions = (),
        rcptOptions: RcptOptions = (),
    ) -> Deferred[Refused]:
        session = self._session()
        message, sender, recipients = outgoingFromStream(stream, sender, recipients)
        return session.sendMessage(sender, recipients, message, mailOptions, rcptOptions)

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
        Send an :class:`email.message.Message`, as :meth:`sendFile` does.
        """
        return self._run(self._sendMail, message, sender, recipients, mailOptions, rcptOptions)

    def _sendMail(
        self,
        message: Message,
        sender: str | None,
        recipients: Recipients,
        mailOptions: MailOptions = (),
        rcptOptions: RcptOptions = (),
    ) -> Deferred[Refused]:
        session = self._session()
        outgoing, sender, recipients = outgoingFromMessage(message, sender, recipients)
        return session.sendMessage(sender, recipients, outgoing, mailOptions, rcptOptions)

    def sendmail(
        self,
        sender: str,
        recipients: Sequence[str] | str,
        message: bytes | str | IO[bytes],
        mailOptions: MailOptions = (),
        rcptOptions: RcptOptions = (),
    ) -> Deferred[Refused]:
        """
        smtplib's ``sendmail``: send ``message`` (bytes, text sent as UTF-8,
        or a binary file, streamed and not closed) from ``sender`` (``""``
        for the null sender) to ``recipients``, as :meth:`sendStream` does.

        :param mailOptions: ESMTP parameters for MAIL, as for
            :meth:`sendFile`.
        :param rcptOptions: ESMTP parameters for every RCPT
            (``"NOTIFY=SUCCESS,FAILURE"``, ``"ORCPT=rfc822;bob@example.org"``),
            or recipient -> its own, as for :meth:`sendFile`.
        :returns: the refused recipients, as :meth:`sendFile` does.
        :raises SMTPError: before anything is sent, when an option is not
            ``KEYWORD`` or ``KEYWORD=VALUE`` (RFC 5321 4.1.2: printable
            ASCII, no space, ``<``, ``>`` or second ``=``); otherwise as
            :meth:`sendFile` does.
        """
        return self._run(self._sendRaw, sender, recipients, message, mailOptions, rcptOptions)

    def _sendRaw(
        self,
        sender: str,
        recipients: Sequence[str] | str,
        message: bytes | str | IO[bytes],
        mailOptions: MailOptions,
        rcptOptions: RcptOptions,
    ) -> Deferred[Refused]:
        session = self._session()
        outgoing, sender, recipients = outgoingFromRaw(sender, recipients, message)
        return session.sendMessage(sender, recipients, outgoing, mailOptions, rcptOptions)

    def _sendPrepared(
        self,
        sender: str,
        recipients: Sequence[str],
        message: OutgoingMessage,
        mailOptions: MailOptions = (),
        rcptOptions: RcptOptions = (),
    ) -> Deferred[Refused]:
        """
        Send a message whose envelope and head are already prepared
        (:mod:`infsmtp._client.envelope`).  For :class:`~infsmtp.ClientPool`, which
        prepares a message once and may send it again on a fresh connection
        when the first one failed before any of the message went out.
        """
        return self._run(self._transaction, sender, recipients, message, mailOptions, rcptOptions)

    def _transaction(
        self,
        sender: str,
        recipients: Sequence[str],
        message: OutgoingMessage,
        mailOptions: MailOptions,
        rcptOptions: RcptOptions,
    ) -> Deferred[Refused]:
        return self._session().sendMessage(sender, recipients, message, mailOptions, rcptOptions)

    def verify(self, username: str) -> Deferred[str]:
        """
        Ask the server about a user name or address (VRFY).

        :returns: the reply text for 250, 251 and 252.
        :raises SMTPError: for any other reply; before sending, when
            ``username`` is empty or holds a space or a control character.
        """
        return self._run(self._verify, username)

    async def _verify(self, username: str) -> str:
        return await self._session().verify(username)

    def noop(self) -> Deferred[str]:
        """
        Send NOOP: is the session still alive?

        :returns: the reply text (for 250).
        :raises SMTPError: for any other reply, or when the connection is
            gone.
        """
        return self._run(self._noop)

    async def _noop(self) -> str:
        return await self._session().noop()

    def rset(self) -> Deferred[None]:
        """
        Send RSET, abandoning any mail transaction (each send starts its
        own; this is for a caller that wants the server's state clean).

        :raises SMTPError: for a reply other than 250.
        """
        return self._run(self._rset)

    async def _rset(self) -> None:
        await self._session().rset()

    def disconnect(self) -> Deferred[None]:
        """
        Send QUIT and close the connection.  Does nothing when not
        connected; never fails, since the connection is closed either way.
        """
        return self._run(self._disconnect)

    async def _disconnect(self) -> None:
        protocol, self._protocol = self._protocol, None
        if protocol is not None:
            await protocol.quit()

    def free(self) -> Deferred[None]:
        """
        Close any connection at once and release everything; the client is
        unusable afterwards.
        """
        protocol, self._protocol = self._protocol, None
        self._freed = True
        if protocol is None:
            return succeed(None)
        return protocol.abort()

    async def __aenter__(self) -> AsyncClient:
        """
        ``async with AsyncClient(host=...) as client:`` connects; leaving the
        block disconnects and frees, also when it raised (and when the
        connect failed).
        """
        try:
            await self.connect()
        except BaseException:
            await self.free()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        try:
            if self._protocol is not None:
                await self.disconnect()
        finally:
            await self.free()


#: What the settings of :class:`AsyncClient` and :func:`sendmail` may name.
_SETTINGS = frozenset(
    {
        "host", "port", "encryptMode", "authMode", "username", "password", "timeout",
        "dataTimeout", "sourceAddress", "socketPath", "endpoint", "verifyServerCertificate",
        "useLegacyServerConnect", "allowUnsafeLegacyRenegotiation", "caCertFile", "heloName",
        "localHostname", "saslMechanisms", "serverHostname", "certFile", "keyFile", "minProtocol",
        "maxProtocol", "tlsConnectionCreator", "tokenProvider", "lmtp", "chunking", "debug",
    }
)


def outgoingFromRaw(
    sender: str, recipients: Sequence[str] | str, message: bytes | str | IO[bytes]
) -> tuple[OutgoingMessage, str, list[str]]:
    """
    What ``sendmail(sender, recipients, message)`` sends: ``message`` is
    bytes, text (sent as UTF-8) or a binary file (streamed, not closed), and
    the envelope is taken as given.

    :raises SMTPError: when ``sender`` or ``recipients`` is ``None``.
    """
    if sender is None or recipients is None:
        raise SMTPError("sendmail() takes the envelope as given: pass sender and recipients")
    if isinstance(message, bytes):
        stream: IO[Any] = io.BytesIO(message)
    elif isinstance(message, str):
        stream = io.StringIO(message)
    else:
        stream = message
    return outgoingFromStream(stream, sender, recipients)


def _applySettings(client: Any, kind: type, settings: Mapping[str, Any]) -> None:
    unknown = sorted(set(settings) - _SETTINGS)
    if unknown:
        raise TypeError(f"{kind.__name__}() got unexpected keyword arguments: {', '.join(unknown)}")
    for name, value in settings.items():
        setattr(client, name, value)


def sendmail(
    message: Message | bytes | str | IO[bytes],
    sender: str | None = None,
    recipients: Recipients = None,
    *,
    mailOptions: MailOptions = (),
    rcptOptions: RcptOptions = (),
    reactor: Any = None,
    **settings: Any,
) -> Deferred[Refused]:
    """
    Send one message on a connection of its own: connect, authenticate,
    send, disconnect, free.  Like ``twisted.mail.smtp.sendmail`` and
    ``aiosmtplib.send``::

        refused = await sendmail(
            message, host="smtp.example.org", port=587,
            encryptMode=EncryptMode.startTls,
            username="me@example.org", password="secret",
        )

    :param message: an :class:`email.message.Message`, the message's bytes
        or text (text is sent as UTF-8), or a binary file (streamed, not
        closed).
    :param sender: the envelope sender; from the headers when ``None``.
    :param recipients: the envelope recipients; from the headers when
        ``None``.
    :param mailOptions: ESMTP parameters for MAIL, as for
        :meth:`AsyncClient.sendFile`.
    :param rcptOptions: ESMTP parameters for RCPT, as for
        :meth:`AsyncClient.sendFile`.
    :param reactor: as for :class:`AsyncClient`.
    :param settings: the :class:`AsyncClient` attributes (``host``,
        ``port``, ``encryptMode``, ``authMode``, ``username``, ``password``,
        ``timeout``, ...).  With a ``username`` and no ``authMode``,
        ``AuthMode.default`` (PLAIN, else LOGIN).
    :returns: the refused recipients, as :meth:`AsyncClient.sendFile` does.
    :raises SMTPAuthenticationError: when the server refused the
        credentials.
    :raises SMTPError: as :meth:`AsyncClient.connect` and
        :meth:`AsyncClient.sendFile` do; an unknown setting raises
        ``TypeError`` at once.

    Cancelling the Deferred closes the connection at once.
    """
    if settings.get("username") and "authMode" not in settings:
        settings["authMode"] = AuthMode.default
    client = AsyncClient(reactor, **settings)
    options = {"mailOptions": mailOptions, "rcptOptions": rcptOptions}
    return Deferred.fromCoroutine(_sendmail(client, message, sender, recipients, options))


async def _sendmail(
    client: AsyncClient,
    message: Message | bytes | str | IO[bytes],
    sender: str | None,
    recipients: Recipients,
    options: dict[str, Any],
) -> Refused:
    async with client:
        if not await client.authenticate():
            raise SMTPAuthenticationError(535, f"the server refused the credentials of {client.username!r}")
        if isinstance(message, Message):
            return await client.sendMail(message, sender, recipients, **options)
        if isinstance(message, bytes):
            return await client.sendStream(io.BytesIO(message), sender, recipients, **options)
        if isinstance(message, str):
            return await client.sendStream(io.StringIO(message), sender, recipients, **options)
        return await client.sendStream(message, sender, recipients, **options)


class _Forwarded:
    """
    A setting of :class:`Client` kept on its :class:`AsyncClient`; on the
    class it yields what ``AsyncClient`` yields (``Client.encryptMode`` is
    the :class:`EncryptMode` enumeration).
    """

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, instance: Client | None, owner: type | None = None) -> Any:
        if instance is None:
            return getattr(AsyncClient, self.name)
        return getattr(instance._client, self.name)

    def __set__(self, instance: Client, value: Any) -> None:
        setattr(instance._client, self.name, value)


class BlockingSends:
    """
    The send methods of a blocking facade (:class:`Client`,
    :class:`~infsmtp.BlockingClientPool`): each waits for the method of the
    same name of the Deferred API behind it (``_call``), with the same
    arguments and the same result or exception.
    """

    def _call(self, name: str, *args: Any, **options: Any) -> Any:
        raise NotImplementedError

    def sendFile(
        self,
        fileName: str,
        sender: str | None = None,
        recipients: Recipients = None,
        *,
        mailOptions: MailOptions = (),
        rcptOptions: RcptOptions = (),
    ) -> Refused:
        """
        Send the message in file ``fileName``: see :meth:`AsyncClient.sendFile`.
        """
        return self._call("sendFile", fileName, sender, recipients, mailOptions=mailOptions, rcptOptions=rcptOptions)

    #: The reference's name for :meth:`sendFile`.
    send = sendFile

    def sendStream(
        self,
        stream: IO[bytes] | IO[str],
        sender: str | None = None,
        recipients: Recipients = None,
        *,
        mailOptions: MailOptions = (),
        rcptOptions: RcptOptions = (),
    ) -> Refused:
        """
        Send the message read from ``stream``: see
        :meth:`AsyncClient.sendStream`.
        """
        return self._call("sendStream", stream, sender, recipients, mailOptions=mailOptions, rcptOptions=rcptOptions)

    def sendMail(
        self,
        message: Message,
        sender: str | None = None,
        recipients: Recipients = None,
        *,
        mailOptions: MailOptions = (),
        rcptOptions: RcptOptions = (),
    ) -> Refused:
        """
        Send an :class:`email.message.Message`: see
        :meth:`AsyncClient.sendMail`.
        """
        return self._call("sendMail", message, sender, recipients, mailOptions=mailOptions, rcptOptions=rcptOptions)

    def sendmail(
        self,
        sender: str,
        recipients: Sequence[str] | str,
        message: bytes | str | IO[bytes],
        mailOptions: MailOptions = (),
        rcptOptions: RcptOptions = (),
    ) -> Refused:
        """
        smtplib's ``sendmail``: see :meth:`AsyncClient.sendmail`.
        """
        return self._call("sendmail", sender, recipients, message, mailOptions, rcptOptions)



class Client(BlockingSends):
    """
    The blocking SMTP client: each method waits for its :class:`AsyncClient`
    counterpart, which runs in the reactor thread (started by crochet on
    first use, or the application's own after ``crochet.no_setup()``).

    A call made in the reactor thread itself raises :class:`SMTPError`:
    waiting there would deadlock, so use :class:`AsyncClient` instead.

    Usable as a context manager: leaving the block disconnects and frees.
    """

    host = _Forwarded()
    port = _Forwarded()
    encryptMode = _Forwarded()
    authMode = _Forwarded()
    username = _Forwarded()
    password = _Forwarded()
    timeout = _Forwarded()
    dataTimeout = _Forwarded()
    sourceAddress = _Forwarded()
    socketPath = _Forwarded()
    endpoint = _Forwarded()
    verifyServerCertificate = _Forwarded()
    useLegacyServerConnect = _Forwarded()
    allowUnsafeLegacyRenegotiation = _Forwarded()
    caCertFile = _Forwarded()
    heloName = _Forwarded()
    localHostname = _Forwarded()
    saslMechanisms = _Forwarded()
    serverHostname = _Forwarded()
    certFile = _Forwarded()
    keyFile = _Forwarded()
    minProtocol = _Forwarded()
    maxProtocol = _Forwarded()
    tlsConnectionCreator = _Forwarded()
    tokenProvider = _Forwarded()
    lmtp = _Forwarded()
    chunking = _Forwarded()
    debug = _Forwarded()

    def __init__(self, **settings: Any) -> None:
        """
        :param settings: attributes to set, as for :class:`AsyncClient`.
        """
        self._client = AsyncClient()
        _applySettings(self, type(self), settings)

    def _call(self, name: str, *args: Any, **options: Any) -> Any:
        return blockingCall(
            f"Client.{name}()", f"AsyncClient.{name}()", getattr(self._client, name), *args, **options
        )

    @property
    def connected(self) -> bool:
        """
        Whether a session is open.
        """
        return self._client.connected

    def connect(self) -> None:
        """
        See :meth:`AsyncClient.connect`.
        """
        self._call("connect")

    def authenticate(self) -> bool:
        """
        See :meth:`AsyncClient.authenticate`.
        """
        return self._call("authenticate")

    def verify(self, username: str) -> str:
        """
        See :meth:`AsyncClient.verify`.
        """
        return self._call("verify", username)

    def noop(self) -> str:
        """
        See :meth:`AsyncClient.noop`.
        """
        return self._call("noop")

    def rset(self) -> None:
        """
        See :meth:`AsyncClient.rset`.
        """
        self._call("rset")

    @property
    def esmtpFeatures(self) -> Mapping[str, str]:
        """
        See :attr:`AsyncClient.esmtpFeatures`.
        """
        return self._client.esmtpFeatures

    def supportsExtension(self, name: str) -> bool:
        """
        See :meth:`AsyncClient.supportsExtension`.
        """
        return self._client.supportsExtension(name)

    @property
    def secure(self) -> bool:
        """
        See :attr:`AsyncClient.secure`.
        """
        return self._client.secure

    @property
    def tlsVersion(self) -> str | None:
        """
        See :attr:`AsyncClient.tlsVersion`.
        """
        return self._client.tlsVersion

    def disconnect(self) -> None:
        """
        See :meth:`AsyncClient.disconnect`.
        """
        self._call("disconnect")

    def free(self) -> None:
        """
        See :meth:`AsyncClient.free`.
        """
        if self._client._protocol is None:
            # Nothing to close, so nothing for the reactor thread to do (and
            # no reason to start one).
            self._client.free()
        else:
            self._call("free")

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        try:
            if self._client._protocol is not None:
                self.disconnect()
        finally:
            self.free()
