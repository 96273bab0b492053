"""
The server's transaction room: MAIL, RCPT, DATA and BDAT (RFC 3030), the
state of the mail transaction (sender, recipients and their parameters,
DSN's among them, the message being received), the trace header, and the
decisions of C{onMailFrom}, C{onRcptTo} and C{onReceive} turned into
replies: one, or in LMTP (RFC 2033) one per accepted recipient.

A mixin of L{infsmtp._server.protocol.ServerProtocol}.
"""

from __future__ import annotations

import email.utils
import re
import time
from typing import Any

from .._dsn import DSNError, parseMailDSN, parseRcptDSN
from .._errors import SMTPError
from .._wire import (
    BARE_NEWLINE,
    LINE_TOO_LONG_IN_DATA,
    MAX_NUMBER_DIGITS,
    TOO_BIG,
    ChunkFramer,
    DataFramer,
    PathSyntaxError,
    SpoolSink,
    formatReply,
    parseMailArguments,
    parseNumber,
    splitEnhancedCode,
)
from .decisions import _TRY_AGAIN, _shortRepr, log

_SAFE_HELO = re.compile(r"[^A-Za-z0-9.\-_:\[\]@]")

_dateCache: tuple[int, str] = (0, "")


def _receivedDate() -> str:
    """
    The RFC 5322 date for C{Received:}, formatted once a second (it costs
    more than the rest of the header).
    """
    global _dateCache
    now = int(time.time())
    if _dateCache[0] != now:
        _dateCache = (now, email.utils.format_datetime(email.utils.localtime()))
    return _dateCache[1]


# The replies of every transaction, formatted once.
_SENDER_OK = formatReply(250, "Sender OK", "2.1.0")
_RECIPIENT_OK = formatReply(250, "Recipient OK", "2.1.5")
_GO_AHEAD = formatReply(354, "End data with <CR><LF>.<CR><LF>")
_CHUNK_OK = formatReply(250, "Chunk accepted", "2.0.0")

#: The onReceive outcome when it fails or is late: 451.
_RECEIVE_TRY_AGAIN = (451, "4.3.0", "Error processing message, try again later")


class MailTransaction:
    """
    MAIL, RCPT, DATA and the message they carry.
    """

    def _resetTransaction(self) -> None:
        self._mailStarted = False
        if self._sink is not None:
            self._releaseSink()
        self.session._resetTransaction()

    def _releaseSink(self) -> None:
        """
        The current message is no longer held: give its memory back to the
        server's budget.
        """
        sink, self._sink = self._sink, None
        if sink is not None:
            sink.release()

    def do_MAIL(self, argument: bytes) -> None:
        settings = self.factory.settings
        if settings.requireStartTls and not self.session.secure:
            self._reply(530, "Must issue a STARTTLS command first", "5.7.0", reason="requireStartTls")
            return
        if not self.session.helo:
            self._error(503, "Error: send HELO/EHLO first", "5.5.1")
            return
        if self._mailStarted:
            self._error(503, "Error: nested MAIL command", "5.5.1")
            return
        if settings.requireAuth and not self.session.authenticated:
            self._reply(530, "Authentication required", "5.7.0", reason="requireAuth")
            return
        try:
            parsed = parseMailArguments(argument, b"FROM:", allowEmpty=True)
        except PathSyntaxError as e:
            self._error(501, f"Syntax: MAIL FROM:<address> ({e})", "5.5.4")
            return
        params = parsed.parameters
        dsn = False
        for keyword, value in params.items():
            if keyword == "SIZE":
                size = parseNumber(value)
                if size is None:
                    self._error(501, f"Syntax: SIZE=number (1 to {MAX_NUMBER_DIGITS} digits)", "5.5.4")
                    return
                if settings.maxMessageSize and size > settings.maxMessageSize:
                    self._reply(552, "Message size exceeds fixed maximum message size", "5.3.4", reason="maxMessageSize")
                    return
            elif keyword == "BODY":
                if value is None or value.upper() not in ("7BIT", "8BITMIME"):
                    self._error(501, "Syntax: BODY=7BIT or BODY=8BITMIME", "5.5.4")
                    return
            elif keyword == "SMTPUTF8":
                if value is not None:
                    self._error(501, "Syntax: SMTPUTF8 takes no value", "5.5.4")
                    return
            elif keyword == "AUTH":
                pass  # RFC 4954 5: accepted, and not trusted.
            elif (keyword == "RET" or keyword == "ENVID") and settings.dsn:
                dsn = True
            else:
                self._error(555, f"MAIL FROM parameter {keyword} not recognized", "5.5.4")
                return
        if dsn:
            try:
                params.update(parseMailDSN(params))
            except DSNError as e:
                self._error(501, f"Syntax: {e}", "5.5.4")
                return
        if not parsed.address.isascii() and "SMTPUTF8" not in params:
            self._reply(553, "Non-ASCII sender address needs SMTPUTF8", "5.6.7", reason="smtputf8")
            return
        self._decideAddress("onMailFrom", parsed.address, params)

    def _decideAddress(self, name: str, address: str, params: dict[str, str | None]) -> None:
        """
        Let C{onMailFrom} or C{onRcptTo} decide on C{address}
        (C{session.address}, C{session.accept}), then answer.
        """
        session = self.session
        session.address = address
        session.accept = True
        # The handler sees the command's parameters (MAIL's also as
        # mailParameters: what SMTPUTF8 and the rest decide by).
        session.parameters = params
        if name == "onMailFrom":
            session.mailParameters = params
        if self._handlers[name] is None:
            self._addressDecided(name, address, params, None)
        else:
            self._decide(name, lambda result: self._addressDecided(name, address, params, result), _TRY_AGAIN)

    def _addressDecided(self, name: str, address: str, params: dict[str, str | None], result: Any) -> None:
        session = self.session
        if isinstance(result, bool):
            session.accept = result
        if name == "onMailFrom":
            if session.accept:
                session.mailFrom = address
                self._mailStarted = True
                self._out.append(_SENDER_OK)
            else:
                session.mailParameters = {}
                self._reply(550, "Sender address rejected", "5.7.1")
        elif session.accept:
            session.rcptTo.append(address)
            if params:
                session.rcptParameters[address] = params
            self._out.append(_RECIPIENT_OK)
        else:
            self._reply(550, "Recipient address rejected", "5.7.1")

    def do_RCPT(self, argument: bytes) -> None:
        settings = self.factory.settings
        if not self._mailStarted:
            self._error(503, "Error: need MAIL command", "5.5.1")
            return
        try:
            parsed = parseMailArguments(argument, b"TO:", allowEmpty=False, allowPostmaster=True)
        except PathSyntaxError as e:
            self._error(501, f"Syntax: RCPT TO:<address> ({e})", "5.5.4")
            return
        params = parsed.parameters
        if params:
            unknown = next((k for k in params if not (settings.dsn and (k == "NOTIFY" or k == "ORCPT"))), None)
            if unknown is not None:
                self._error(555, f"RCPT TO parameter {unknown} not recognized", "5.5.4")
                return
            try:
                dsn = parseRcptDSN(params)
            except DSNError as e:
                self._error(501, f"Syntax: {e}", "5.5.4")
                return
            if "NOTIFY" in dsn:
                params["NOTIFY"] = ",".join(dsn["NOTIFY"])  # type: ignore[arg-type]
            if "ORCPT" in dsn:
                params["ORCPT"] = "%s;%s" % dsn["ORCPT"]  # type: ignore[str-format]
        if not parsed.address.isascii() and "SMTPUTF8" not in self.session.mailParameters:
            self._reply(553, "Non-ASCII recipient address needs SMTPUTF8", "5.6.7", reason="smtputf8")
            return
        if len(self.session.rcptTo) >= settings.maxRecipients:
            self._reply(452, "Too many recipients", "4.5.3", reason="maxRecipients")
            return
        self._decideAddress("onRcptTo", parsed.address, params)

    def do_DATA(self, argument: bytes) -> None:
        settings = self.factory.settings
        if argument:
            self._error(501, "Syntax: DATA", "5.5.4")
            return
        if not self._mailStarted:
            self._error(503, "Error: need MAIL command", "5.5.1")
            return
        if not self.session.rcptTo:
            self._error(554, "Error: no valid recipients", "5.5.1")
            return
        if self._sink is not None:
            # RFC 3030 2: a message is sent with DATA or with BDAT, not both.
            self._error(503, "Error: BDAT in progress, DATA not allowed", "5.5.1")
            return
        self._out.append(_GO_AHEAD)
        sink = self._startMessage()
        self._dataFramer = DataFramer(sink, settings.maxMessageSize or None, settings.maxDataLineLength)

    def _startMessage(self) -> SpoolSink:
        """
        A new message: its queue id, the sink that holds it, and its trace
        header.
        """
        settings = self.factory.settings
        self._messages += 1
        # The x keeps ids apart: session 0x1's message 0x11 and session
        # 0x11's message 0x1 would both end in "111" without it.
        self._queueId = self.session.queueId = f"{self.factory.queuePrefix}{self.session.id:x}x{self._messages:x}"
        sink = self._sink = SpoolSink(settings.spoolThreshold, self.factory.memoryBudget)
        if settings.receivedHeader:
            sink.write(self._receivedHeader(self._queueId))
        return sink

    def do_BDAT(self, argument: bytes) -> None:
        """
        A chunk of the message (RFC 3030): C{BDAT size [LAST]}, then
        exactly C{size} octets.  A refused chunk is read all the same (the
        octets are not commands), then answered.
        """
        words = argument.split()
        size = parseNumber(words[0].decode("ascii", "replace")) if words else None
        last = len(words) == 2 and words[1].upper() == b"LAST"
        if size is None or len(words) > 2 or (len(words) == 2 and not last):
            # Without its size the chunk cannot be told from the commands
            # after it: reading them as commands would run a message's
            # content.  The session ends here.
            self._reply(501, "Syntax: BDAT size [LAST]", "5.5.4", reason="protocol")
            self._close()
            return
        settings = self.factory.settings
        session = self.session
        sink = self._sink
        if not settings.chunking or self._withdrawnBy("CHUNKING"):
            refusal = (502, "BDAT not available", "5.5.1")
        elif not self._mailStarted:
            refusal = (503, "Error: need MAIL command", "5.5.1")
        elif not session.rcptTo:
            refusal = (554, "Error: no valid recipients", "5.5.1")
        else:
            refusal = None
            if sink is None:
                sink = self._startMessage()
                self._chunked = 0
        framer = ChunkFramer(
            None if refusal is not None else sink, size, last, settings.maxMessageSize or None, self._chunked
        )
        self._chunkRefusal = refusal
        if size:
            self._dataFramer = framer
        else:
            self._chunkComplete(framer)

    def _chunkComplete(self, framer: ChunkFramer) -> None:
        refusal, self._chunkRefusal = self._chunkRefusal, None
        if refusal is not None:
            self._error(*refusal)
            return
        if framer.fault is not None:
            # RFC 3030 2: the transaction ends; later chunks get 503.
            self._reply(552, "Message size exceeds fixed maximum message size", "5.3.4", reason="maxMessageSize")
            self._resetTransaction()
            self._afterMessage()
            return
        self._chunked = framer.size
        if not framer.last:
            self._out.append(_CHUNK_OK)
            return
        sink = self._sink
        assert sink is not None
        self._messageReceived(sink, crlfOnly=False)

    def _feedData(self, data: bytes) -> None:
        framer = self._dataFramer
        assert framer is not None
        rest = framer.feed(data)
        if rest is None:
            return
        self._dataFramer = None
        if rest:
            self._framer.feed(rest)
        if framer.__class__ is ChunkFramer:
            self._chunkComplete(framer)  # type: ignore[arg-type]
        else:
            self._messageComplete(framer)

    def _messageComplete(self, framer: DataFramer) -> None:
        if framer.fault is not None:
            # Replied before the reset: the log line names the message.
            if framer.fault == TOO_BIG:
                self._reply(552, "Message size exceeds fixed maximum message size", "5.3.4", reason="maxMessageSize")
            elif framer.fault == LINE_TOO_LONG_IN_DATA:
                self._reply(500, "Line too long in message data", "5.5.2", reason="maxDataLineLength")
            elif framer.fault == BARE_NEWLINE:
                self._reply(550, "Message contains bare CR or LF; use CRLF line endings", "5.5.2", reason="bareNewline")
            self._resetTransaction()
            self._afterMessage()
            return
        sink = framer.sink
        assert isinstance(sink, SpoolSink)
        self._messageReceived(sink)

    def _messageReceived(self, sink: SpoolSink, crlfOnly: bool = True) -> None:
        """
        The whole message is in (DATA's end, or BDAT's last chunk): hand it
        to C{onReceive}.  C{crlfOnly}: whether every CR in it begins a CRLF
        (DATA's framer sees to it; BDAT's octets are as the client sent
        them).
        """
        session = self.session
        if sink.spooled:
            session._setMessage(None, sink.file(), crlfOnly)
        else:
            session._setMessage(sink.getvalue(), None, crlfOnly)
        session.received = True
        self._decide("onReceive", self._receiveDecided, _RECEIVE_TRY_AGAIN, self._transactionDone)

    def _receiveDecided(self, result: Any) -> None:
        session = self.session
        if isinstance(result, bool):
            session.received = result
        if self._lmtp:
            self._eachRecipientDecided()
            return
        if session.received:
            # A hex id: one line, nothing to check, so no formatReply.
            self._out.append(b"250 2.0.0 OK queued as %s\r\n" % self._queueId.encode("ascii"))
            if self._verbose:
                sink = self._sink
                self._events.accepted(self, sink.size if sink is not None else 0)
        else:
            self._reply(554, "Message rejected", "5.7.1")

    def _eachRecipientDecided(self) -> None:
        """
        LMTP: one reply per accepted recipient, in their order, from
        C{session.rcptResults} where the handler decided one, else from the
        message's decision.  Fail closed: an outcome that is not a C{bool}
        or an L{SMTPError} with a 2xx, 4xx or 5xx code is answered 451 for
        that recipient.
        """
        session = self.session
        results = session.rcptResults
        if type(results) is not dict:
            log.error(
                "onReceive handler set session.rcptResults to {value}, not a dict (session {id}): answered 451",
                value=_shortRepr(results),
                id=session.id,
            )
            results = dict.fromkeys(session.rcptTo, None)
        queued = b" OK queued as " + self._queueId.encode("ascii")
        taken = False
        for address in session.rcptTo:
            outcome = results.get(address, session.received)
            if outcome is True:
                self._out.append(b"250 2.0.0 <" + address.encode("utf-8") + b">" + queued + b"\r\n")
                taken = True
            elif outcome is False:
                self._reply(550, f"<{address}> Message rejected", "5.7.1", varies=True)
            elif isinstance(outcome, SMTPError) and outcome.code is not None and 200 <= outcome.code < 600 and not 300 <= outcome.code < 400:
                if outcome.code < 300:
                    taken = True
                enhanced, text = splitEnhancedCode(outcome.text or "")
                self._reply(outcome.code, f"<{address}> {text}".rstrip(), enhanced, varies=True)
            else:
                log.error(
                    "onReceive handler decided {value} for <{address}>, not True, False or an SMTPError "
                    "(session {id}): answered 451",
                    value=_shortRepr(outcome),
                    address=address,
                    id=session.id,
                )
                self._reply(451, f"<{address}> Error processing message, try again later", "4.3.0", varies=True)
        if taken and self._verbose:
            sink = self._sink
            self._events.accepted(self, sink.size if sink is not None else 0)

    def _transactionDone(self) -> None:
        self._resetTransaction()
        self._afterMessage()

    def _afterMessage(self) -> None:
        if self._shuttingDown:
            self.shutdown()

    def _receivedHeader(self, queueId: str) -> bytes:
        session = self.session
        if session.helo is not self._heloSeen:
            # Once per EHLO, not once per message.
            self._heloSeen = session.helo
            self._heloSafe = _SAFE_HELO.sub("?", session.helo)[:64] or "unknown"
        helo = self._heloSafe
        withProtocol = "LMTP" if self._lmtp else ("ESMTP" if self._ehlo else "SMTP")
        if "SMTPUTF8" in session.mailParameters:
            withProtocol = "UTF8LMTP" if self._lmtp else "UTF8SMTP"
        if session.secure:
            withProtocol += "S"
        if session.authenticated:
            withProtocol += "A"
        recipient = f"\r\n\tfor <{session.rcptTo[0]}>" if len(session.rcptTo) == 1 else ""
        date = _receivedDate()
        tls = f" ({session.tlsVersion})" if session.tlsVersion else ""
        client = f"[{session.ip}]" if session.ip else "unix socket"
        header = (
            f"Received: from {helo} ({client})\r\n"
            f"\tby {self.factory.settings.hostname} (infsmtp) with {withProtocol}{tls}\r\n"
            f"\tid {queueId}{recipient}; {date}\r\n"
        )
        return header.encode("utf-8", "replace")
