"""
L{Session}: what a server handler receives.
"""

from __future__ import annotations

import email.parser
import email.policy
import io
import os
from email.message import EmailMessage
from typing import IO, Any, Callable

from twisted.internet import reactor as _reactor
from twisted.python import threadable


class Session:
    """
    One client connection, as the handlers see it.

    The reference's fields are here under its names; handlers read them and
    set the decision fields (C{accept}, C{authenticated}, C{received}).

    @ivar id: a number unique among the server's sessions.
    @ivar ip: the client's address (the proxied client's behind PROXY; an
        IPv4 client of a dual-stack listener as IPv4), or C{""} for a UNIX
        socket's client.
    @ivar port: the client's port.
    @ivar helo: the name the client gave in HELO/EHLO, or C{""}.
    @ivar secure: whether TLS protects the connection.
    @ivar tlsVersion: the negotiated TLS version, e.g. C{"TLSv1.3"}, or
        C{""}.
    @ivar username: the AUTH user name (C{onLogin} and after).
    @ivar password: the AUTH password (C{onLogin} only; cleared after).
    @ivar authenticated: set in C{onLogin}; afterwards, whether AUTH
        succeeded.
    @ivar address: the address of the MAIL or RCPT being decided; C{""} for
        the null sender C{<>}.
    @ivar accept: set in C{onConnect}, C{onMailFrom}, C{onRcptTo},
        C{onEhlo} (C{False} refuses the EHLO), and C{onVrfy}, where it is
        L{None} until set (C{True}: 250, C{False}: 550, L{None}: 252).
    @ivar mailFrom: the accepted sender of the current transaction.
    @ivar rcptTo: the accepted recipients of the current transaction, in
        order.
    @ivar msg: in C{onReceive}, the message as bytes (dot-unstuffed, CRLF
        line endings, after our C{Received:} header).
    @ivar received: set in C{onReceive}: C{True} answers 250, C{False} 554.
    @ivar mailParameters: the ESMTP parameters of the current MAIL command
        (keyword in upper case -> value or L{None}), already in
        C{onMailFrom}.  DSN's are checked and decoded: C{RET} is C{"FULL"}
        or C{"HDRS"}, C{ENVID} the decoded text.
    @ivar parameters: the ESMTP parameters of the MAIL or RCPT being
        decided (in C{onMailFrom}, C{onRcptTo}); DSN's C{NOTIFY} is the
        events in upper case (C{"SUCCESS,FAILURE"}), C{ORCPT}
        C{"type;address"} decoded.
    @ivar rcptParameters: accepted recipient -> its RCPT parameters (as in
        C{parameters}), for C{onReceive}; a recipient that gave none is not
        in it (C{session.rcptParameters.get(address, {})}).
    @ivar rcptResults: in LMTP, what C{onReceive} may set to decide
        recipient by recipient: address -> C{True} (250), C{False} (550) or
        an L{SMTPError} (its reply); a recipient not in it gets the
        message's decision (C{received}).
    @ivar queueId: the id of the current message, told to the client in
        C{250 ... queued as}; set from DATA on.
    @ivar extensions: in C{onEhlo}, the extensions this EHLO reply will
        list, in order: keyword -> its parameters as one string
        (C{"SIZE": "33554432"}), or L{None} when it has none.  Remove,
        add or change entries (or set a new dict); see L{Server}.
    @ivar data: a dict for the handlers' own state, kept for the session.
        (Other attributes cannot be added: setting a misspelt one raises
        L{AttributeError}.)
    """

    # Slots, not a __dict__: a misspelt decision (C{session.accepted =
    # False}) raises AttributeError, which answers 4xx, instead of being
    # silently ignored while the real C{accept} stays True.  A handler's own
    # state goes in C{data}.
    __slots__ = (
        "id",
        "ip",
        "port",
        "_disconnect",
        "helo",
        "secure",
        "tlsVersion",
        "username",
        "password",
        "authenticated",
        "address",
        "accept",
        "mailFrom",
        "rcptTo",
        "mailParameters",
        "parameters",
        "rcptParameters",
        "rcptResults",
        "received",
        "queueId",
        "data",
        "extensions",
        "_msg",
        "_message",
        "_msgFile",
        "_crlfOnly",
        "__weakref__",
    )

    def __init__(self, id: int, ip: str, port: int, disconnect: Callable[[], None]) -> None:
        self.id = id
        self.ip = ip
        self.port = port
        self._disconnect = disconnect
        self.helo = ""
        self.secure = False
        self.tlsVersion = ""
        self.username = ""
        self.password = ""
        self.authenticated = False
        self.address = ""
        self.accept = True
        self.mailFrom = ""
        self.rcptTo: list[str] = []
        self.mailParameters: dict[str, str | None] = {}
        self.parameters: dict[str, str | None] = {}
        self.rcptParameters: dict[str, dict[str, str | None]] = {}
        self.rcptResults: dict[str, Any] = {}
        self.received = True
        self.queueId = ""
        self.data: dict[str, Any] = {}
        self.extensions: dict[str, str | None] = {}
        self._msg: bytes | None = b""
        self._message: EmailMessage | None = None
        self._msgFile: IO[bytes] | None = None
        # Whether the message is as the server framed it (every line ends
        # in CRLF, no bare CR or LF: the DATA framer refuses them), or was
        # set by a handler, which may have put anything there.
        self._crlfOnly = True

    def disconnect(self) -> None:
        """
        Close the connection (after replies already queued are sent).  Safe
        to call from a script running in the thread pool.
        """
        if threadable.isInIOThread():
            self._disconnect()
        else:
            _reactor.callFromThread(self._disconnect)

    @property
    def msg(self) -> bytes:
        """
        In C{onReceive}, the message as bytes (dot-unstuffed, CRLF line
        endings, after our C{Received:} header).  A large message is kept in
        a temporary file until this is first read; read C{msgFile} instead
        to keep memory flat.
        """
        if self._msg is None:
            source = self._msgFile
            if source is None:
                return b""
            source.seek(0)
            self._msg = source.read()
        return self._msg

    @msg.setter
    def msg(self, value: bytes) -> None:
        self._msg = value
        self._message = None
        self._crlfOnly = False

    @property
    def msgFile(self) -> IO[bytes]:
        """
        In C{onReceive}, the message as a binary file positioned at its
        start: the spool file for a large message, else a view of C{msg}.
        Valid until C{onReceive} completes.
        """
        if self._msgFile is not None:
            self._msgFile.seek(0)
            return self._msgFile
        return io.BytesIO(self.msg)

    @property
    def msgSize(self) -> int:
        """
        The size of C{msg} in bytes, without loading a spooled message.
        """
        if self._msg is None and self._msgFile is not None:
            return os.fstat(self._msgFile.fileno()).st_size
        return len(self.msg)

    @property
    def message(self) -> EmailMessage:
        """
        C{msg} parsed as an L{email.message.EmailMessage} (parsed on first
        use, then kept).
        """
        if self._message is None:
            parser = email.parser.BytesParser(policy=email.policy.default)
            if self._msg is None and self._msgFile is not None:
                self._message = parser.parse(self.msgFile)  # type: ignore[assignment]
            else:
                self._message = parser.parsebytes(self.msg)  # type: ignore[assignment]
        return self._message  # type: ignore[return-value]

    def _setMessage(self, msg: bytes | None, msgFile: IO[bytes] | None = None, crlfOnly: bool = True) -> None:
        """
        Hold the received message: as bytes, or (C{msg=None}) in a file.
        C{crlfOnly}: every CR in it begins a CRLF (true of DATA, whose
        framer refuses bare CRs; not known of BDAT's counted octets).
        """
        self._msg = msg
        self._msgFile = msgFile
        self._message = None
        self._crlfOnly = crlfOnly

    def _resetTransaction(self) -> None:
        self.queueId = ""
        self.mailFrom = ""
        self.mailParameters = {}
        # Mostly empty: a new dict only when something was put in one.
        if self.parameters:
            self.parameters = {}
        if self.rcptParameters:
            self.rcptParameters = {}
        if self.rcptResults:
            self.rcptResults = {}
        self.rcptTo = []
        if self._msgFile is not None:
            self._msgFile.close()
        self._setMessage(b"")

    def deliveryFacts(self) -> dict[str, Any]:
        """
        The fields a delivery logs about the current message: C{sessionId},
        C{client}, C{sender}, C{recipients}, C{size}, C{tls} (the message is
        not loaded to size it).
        """
        return {
            "sessionId": self.id,
            "client": f"{self.ip}:{self.port}",
            "sender": self.mailFrom,
            "recipients": ",".join(f"<{r}>" for r in self.rcptTo),
            "size": self.msgSize,
            "tls": "yes" if self.secure else "no",
        }

    def _release(self) -> None:
        """
        The connection is gone: close the spool file and let go of the
        protocol, so that the session holds nothing once its handlers are
        done with it.
        """
        self._resetTransaction()
        self._disconnect = _gone

    def __repr__(self) -> str:
        return f"<Session {self.id} {self.ip}:{self.port} helo={self.helo!r}>"


def _gone() -> None:
    """
    C{session.disconnect()} once the connection is gone: nothing to do.
    """
