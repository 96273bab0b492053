"""
The server's policy-controls room (issue 14, item 5): the greeting delay
that catches clients talking before the 220 (pregreet detection, as
Postfix's postscreen does), and the C{onEhlo} and C{onVrfy} hooks.

A mixin of L{infsmtp._server.protocol.ServerProtocol}.  None of it runs unless it
is configured: without a greeting delay the greeting goes out as it always
did, without C{onEhlo} the EHLO reply comes from the per-factory cache,
and without C{onVrfy} VRFY answers 252.  (C{requireStartTls} is one check
in each command it guards: MAIL, AUTH, VRFY.)

What a handler leaves is checked, fail closed: an extension list that
would not make a valid EHLO reply is never sent (the client gets 421 and
tries again later, rather than a broken list or a silent downgrade to
HELO without STARTTLS).
"""

from __future__ import annotations

import re
from typing import Any

from twisted.logger import Logger

from .._wire import decodeText, formatReply
from .decisions import _CONNECT_TRY_AGAIN, _TRY_AGAIN

log = Logger(namespace="infsmtp.server")

#: A failing, late or wrong C{onEhlo}: the session cannot go on sensibly
#: without a valid extension list, and a client told 4xx to EHLO may fall
#: back to HELO (losing STARTTLS); so it closes and the client retries.
_EHLO_TRY_AGAIN = (421, "4.3.0", "Temporary failure, try again later")

#: RFC 5321 4.1.1.1: ehlo-keyword = (ALPHA / DIGIT) *(ALPHA / DIGIT / "-").
_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]{0,63}")
#: ehlo-param = 1*(%d33-126), separated by single spaces.
_PARAMS = re.compile(r"[\x21-\x7e]+(?: [\x21-\x7e]+)*")
#: Extensions one EHLO reply may list, and the longest parameter text: a
#: reply line stays well within 512 octets.
MAX_EXTENSIONS = 64
MAX_PARAMS_LENGTH = 400

#: The extensions whose removal by C{onEhlo} also withdraws the command
#: for the session (as Postfix's C{smtpd_discard_ehlo_keywords} does):
#: hiding AUTH from a client must not leave AUTH usable by it.
WITHDRAWABLE = ("AUTH", "STARTTLS", "CHUNKING")

#: The longest VRFY argument looked up (RFC 5321 4.5.3.1.3: a path is at
#: most 256 octets), so that the reply echoing it stays one short line.
MAX_VRFY_LENGTH = 256


def extensionsForHandler(listed: dict[bytes, list[bytes] | None]) -> dict[str, str | None]:
    """
    L{ServerProtocol.extensions} as C{onEhlo} sees it: keyword -> its
    parameters as one string, or L{None} when it takes none.
    """
    offered: dict[str, str | None] = {}
    for keyword, params in listed.items():
        if params is None:
            offered[keyword.decode("ascii")] = None
        elif params:
            # (Twisted omits an extension whose parameter list is empty.)
            offered[keyword.decode("ascii")] = b" ".join(params).decode("ascii")
    return offered


def extensionLines(extensions: Any) -> tuple[list[str], str | None]:
    """
    The lines of an EHLO reply for what C{onEhlo} left in
    C{session.extensions}, or why it cannot be sent.

    @return: (lines, L{None}), or ([], the problem in a few words).
    """
    if type(extensions) is not dict:
        return [], f"is a {type(extensions).__name__}, not a dict"
    if len(extensions) > MAX_EXTENSIONS:
        return [], f"lists {len(extensions)} extensions, more than {MAX_EXTENSIONS}"
    lines = []
    seen = set()
    for keyword, params in extensions.items():
        if type(keyword) is not str or not _KEYWORD.fullmatch(keyword):
            return [], f"has the keyword {keyword!r}, not letters, digits and hyphens"
        upper = keyword.upper()
        if upper in seen:
            return [], f"lists {upper} twice"
        seen.add(upper)
        if params is None or params == "":
            lines.append(keyword)
        elif type(params) is not str or len(params) > MAX_PARAMS_LENGTH or not _PARAMS.fullmatch(params):
            return [], f"gives {keyword} the parameters {params!r}, not printable ASCII words"
        else:
            lines.append(f"{keyword} {params}")
    return lines, None


def vrfyAddress(argument: bytes) -> str | None:
    """
    The mailbox or name a VRFY asks about (angle brackets removed), or
    L{None} when it is not one short line of UTF-8 text.
    """
    if len(argument) > MAX_VRFY_LENGTH:
        return None
    text = decodeText(argument.strip())
    if not text:
        return None
    if text[0] == "<" and text[-1] == ">":
        text = text[1:-1]
    return text or None


class PolicyHooks:
    """
    Pregreet detection, C{onEhlo} and C{onVrfy}.
    """

    #: While the greeting waits, C{dataReceived} is L{_talkedFirst} (on the
    #: instance, so that the class's stays as it is for every other
    #: session, and for this one once greeted).
    _greetWaiting = False
    #: The commands C{onEhlo} withdrew from this session by removing their
    #: keyword (see L{WITHDRAWABLE}); L{None}: none.
    _withdrawn: frozenset[str] | None = None
    _ehloAnswered = False

    # Pregreet detection --------------------------------------------------

    def _waitToGreet(self, delay: float) -> None:
        """
        Hold the greeting for C{delay} seconds; whatever the client sends
        meanwhile (or while C{onConnect}, which runs after the delay, is
        deciding) ends the session with 554.
        """
        self._greetWaiting = True
        self.dataReceived = self._talkedFirst  # type: ignore[method-assign]
        self._delayed = self._clock.callLater(delay, self._greetTime)

    def _stopWaitingToGreet(self) -> None:
        self._greetWaiting = False
        # The class's dataReceived again (and no cycle through the
        # instance's bound method).
        del self.dataReceived

    def _greetTime(self) -> None:
        """
        The client waited: now C{onConnect} decides, then the greeting.
        """
        self._delayed = None
        # The idle deadline counts from the greeting, not from the connect.
        self._lastInput = self._seconds()
        self._decide("onConnect", self._greetAfterDelay, _CONNECT_TRY_AGAIN)
        self._flush()

    def _greetAfterDelay(self, result: Any) -> None:
        self._stopWaitingToGreet()
        self._afterConnect(result)

    def _talkedFirst(self, data: bytes) -> None:
        """
        C{dataReceived} before the greeting: an RFC 5321 client waits for
        the 220 (3.1, 4.3.1), a spam bot often does not.
        """
        if self._closing:
            return
        self._stopWaitingToGreet()
        self._bytesIn += len(data)
        delayed, self._delayed = self._delayed, None
        if delayed is not None and delayed.active():
            delayed.cancel()
        pending, self._pending = self._pending, None
        if pending is not None:
            # onConnect was deciding: its decision no longer matters (its
            # late answer is ignored, a coroutine gets CancelledError).
            self._busy = False
            if pending.timer.active():
                pending.timer.cancel()
            if pending.deferred is not None:
                pending.deferred.cancel()
        # For the log: what it said first (its first line).
        self._line = data.split(b"\n", 1)[0].rstrip(b"\r")
        if self._debug:
            self._events.transcript(self, "<", self._line.decode("utf-8", "replace") + " (before the greeting)")
        self._reply(554, "Protocol error: talked before the greeting", "5.5.1", reason="pregreet")
        self._close()

    # onEhlo -----------------------------------------------------------------

    def _ehloHook(self) -> None:
        """
        EHLO with an C{onEhlo} handler: it sees (and may edit)
        C{session.extensions}, and may refuse.  C{session.helo} is set for
        it, and cleared again unless the EHLO is answered 250.
        """
        session = self.session
        offered = session.extensions = extensionsForHandler(self.extensions())
        defaults = frozenset(offered)
        session.accept = True
        self._ehloAnswered = False
        self._decide(
            "onEhlo", lambda result: self._ehloDecided(result, defaults), _EHLO_TRY_AGAIN, self._ehloDone
        )

    def _ehloDecided(self, result: Any, defaults: frozenset[str]) -> None:
        session = self.session
        if isinstance(result, bool):
            session.accept = result
        if not session.accept:
            self._reply(550, "EHLO rejected", "5.7.1")
            return
        lines, problem = extensionLines(session.extensions)
        if problem is not None:
            log.error(
                "onEhlo handler left session.extensions that {problem} (session {id}): answered {code}",
                problem=problem,
                id=session.id,
                code=_EHLO_TRY_AGAIN[0],
            )
            self._temporary(_EHLO_TRY_AGAIN)
            return
        self._ehloAnswered = True
        listed = {line.split(" ", 1)[0].upper() for line in lines}
        withdrawn = frozenset(k for k in WITHDRAWABLE if k in defaults and k not in listed)
        self._withdrawn = withdrawn or None
        hello = f"{self.factory.settings.hostname} Hello {session.ip or 'unix socket'}"
        self._out.append(formatReply(250, "\n".join([hello, *lines]), ""))

    def _ehloDone(self) -> None:
        if not self._ehloAnswered:
            # Refused (or failed): the client has not greeted.
            self.session.helo = ""
            self._ehlo = False

    def _withdrawnBy(self, keyword: str) -> bool:
        """
        Whether C{onEhlo} removed C{keyword} from this session's list.
        """
        return self._withdrawn is not None and keyword in self._withdrawn

    # onVrfy -----------------------------------------------------------------

    def _vrfyHook(self, argument: bytes) -> None:
        address = vrfyAddress(argument)
        if address is None:
            self._error(501, "Syntax: VRFY address (one line of text, at most 256 octets)", "5.5.4")
            return
        session = self.session
        session.address = address
        # None until the handler decides: left so, VRFY answers 252.
        session.accept = None  # type: ignore[assignment]
        self._decide("onVrfy", lambda result: self._vrfyDecided(result, address), _TRY_AGAIN)

    def _vrfyDecided(self, result: Any, address: str) -> None:
        known = result if isinstance(result, bool) else self.session.accept
        # The decision is VRFY's alone: MAIL and RCPT set their own.
        self.session.accept = True
        if known is True:
            self._reply(250, f"<{address}>", "2.1.5", varies=True)
        elif known is False:
            self._reply(550, f"<{address}>: User unknown", "5.1.1", varies=True)
        else:
            self._reply(252, "Cannot VRFY user, but will accept message and attempt delivery", "2.5.0")
