"""
The session log: what happens in each SMTP session, as C{twisted.logger}
events with fields, and the one place the metrics hear about it too.

The protocol reports at a few points (connect, TLS up, a 4xx/5xx reply,
an AUTH result, a message accepted, disconnect, and with C{debug} every
line in and out); L{SessionEvents} turns each into one event dict and hands
it to its observers: the global log publisher and, when enabled, the
server's metrics.  One mechanism, so a count in C{/metrics} and a line in
the log never disagree.

Cost is the rule here, because the log path is on every message: events
about refusals (every 4xx/5xx, AUTH failures) are always built, being rare
and what an operator needs; the success-path ones (connect, accepted,
disconnect, AUTH success) only when C{Server(sessionLog=True)} or metrics
ask for them, and their text is formatted only when an observer asks for
it (L{formatLine}).  Postfix's log is the model for the text: one short
line per event, every value from the wire escaped, the queue id on every
line about a message::

    session=1 queue=3F2A1Cx1 reject: RCPT from [192.0.2.7]:40310: 550 5.7.1 Recipient address rejected; from=<a@example.org> to=<b@example.net> helo=<client.test> handler=onRcptTo

L{LogFileObserver} writes those lines (or JSON, one object a line) for
C{twistd infsmtp --log-format text|json}.

Nothing here touches a transport: the protocol passes what it knows.
"""

from __future__ import annotations

import json
import os
import stat
import time
from functools import partial
from typing import IO, Any, Callable

from twisted.logger import FileLogObserver, ILogObserver, Logger, LogLevel, formatEvent, globalLogPublisher
from twisted.python.compat import ioType
from twisted.python.failure import Failure
from twisted.python.threadable import isInIOThread
from zope.interface import implementer

NAMESPACE = "infsmtp.session"

#: A value from the wire is cut to this many characters in a log line.
MAX_FIELD = 200

_logger = Logger(namespace=NAMESPACE)

#: Event names (the C{event} field).
CONNECT = "connect"
TLS = "tls"
REJECT = "reject"
AUTH = "auth"
ACCEPTED = "accepted"
DISCONNECT = "disconnect"
TRANSCRIPT = "transcript"
#: Metrics only (never logged): how long a handler took to answer.
HANDLER = "handler"


def escape(text: str, limit: int = MAX_FIELD) -> str:
    """
    C{text} for a log line: control characters (a bare CR or LF would
    forge a line) as C{\\xNN} escapes, and at most C{limit} characters.
    """
    if not text.isprintable():
        text = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return text


def describeCommand(line: bytes | None) -> str:
    """
    The command line of a reject, as logged: the verb and its argument, but
    never an AUTH initial response (it holds the password): C{AUTH PLAIN}.
    """
    if line is None:
        return ""
    verb, _, argument = line.decode("utf-8", "replace").partition(" ")
    verb = verb.upper()
    if verb == "AUTH":
        return " ".join(["AUTH", *argument.split()[:1]]).upper()
    return escape(f"{verb} {argument}" if argument else verb)


def _client(event: dict[str, Any]) -> str:
    ip = event.get("ip")
    return f"[{ip}]:{event.get('port', 0)}" if ip else "unix socket"


def _addresses(addresses: Any) -> str:
    return ",".join(f"<{escape(a)}>" for a in addresses)


def formatLine(event: dict[str, Any]) -> str:
    """
    The text of a session event (without time or namespace), Postfix-like:
    C{session=… queue=… what: details}.
    """
    name = event.get("event")
    head = f"session={event.get('session')}"
    if event.get("worker") is not None:
        head = f"worker={event['worker']} {head}"
    queue = event.get("queue")
    if queue:
        head += f" queue={queue}"
    if name == TRANSCRIPT:
        return f"{head} {event['direction']} {escape(event['line'], 400)}"
    client = _client(event)
    if name == REJECT:
        command = event.get("command") or "CONNECT"
        text = f"{head} reject: {command} from {client}: {event['code']} {escape(event['reply'])}"
        details = []
        if event.get("sender") is not None:
            details.append(f"from=<{escape(event['sender'])}>")
        if event.get("recipients"):
            details.append(f"to={_addresses(event['recipients'])}")
        if event.get("helo"):
            details.append(f"helo=<{escape(event['helo'])}>")
        if event.get("handler"):
            details.append(f"handler={event['handler']}")
        if event.get("reason"):
            details.append(f"reason={event['reason']}")
        return text + ("; " + " ".join(details) if details else "")
    if name == AUTH:
        outcome = "ok" if event["success"] else "failed"
        return f"{head} auth {outcome}: {event['mechanism']} user=<{escape(event['username'])}> from {client}"
    if name == ACCEPTED:
        return (
            f"{head} accepted from {client}: from=<{escape(event['sender'])}> "
            f"to={_addresses(event['recipients'])} size={event['size']}"
        )
    if name == CONNECT:
        tls = " tls=implicit" if event.get("tls") else ""
        return f"{head} connect from {client} to {event.get('listener')}{tls}"
    if name == TLS:
        resumed = " resumed" if event.get("resumed") else ""
        return f"{head} tls {event.get('version')}{resumed} from {client}"
    if name == DISCONNECT:
        return (
            f"{head} disconnect from {client} commands={event['commands']} messages={event['messages']} "
            f"rejects={event['rejects']} bytes={event['bytes']} duration={event['duration']:.3f}"
        )
    return head + " " + str(name)


class SessionEvents:
    """
    The session log and metrics feed of one server (see the module
    docstring).

    @ivar verbose: build the success-path events too (the session log is on,
        or metrics are): read by the protocol before reporting one.
    @ivar timing: time the handlers (metrics are on).
    @ivar debug: report every line in and out (the transcript).
    @ivar worker: the C{--workers} worker number, or L{None}.
    """

    def __init__(
        self,
        sessionLog: bool = False,
        debug: bool = False,
        metrics: Callable[[dict[str, Any]], None] | None = None,
        worker: int | None = None,
        publisher: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.sessionLog = sessionLog
        self.debug = debug
        self.metrics = metrics
        self.worker = worker
        self.publisher = publisher or globalLogPublisher
        self.verbose = sessionLog or debug or metrics is not None
        self.timing = metrics is not None

    def _emit(self, level: LogLevel, name: str, protocol: Any, fields: dict[str, Any]) -> None:
        session = protocol.session
        fields["event"] = name
        fields["session"] = session.id
        fields["worker"] = self.worker
        fields["ip"] = session.ip
        fields["port"] = session.port
        fields["queue"] = session.queueId or None
        event = fields.copy()
        event["log_namespace"] = NAMESPACE
        event["log_level"] = level
        event["log_format"] = "{text()}"
        event["log_time"] = time.time()
        event["log_source"] = None
        event["log_logger"] = _logger
        # The text, formatted only if an observer asks ("{text()}"); from
        # the fields, not the event, so that no cycle keeps an event alive
        # until the garbage collector runs.
        event["text"] = partial(formatLine, fields)
        if self.metrics is not None:
            try:
                self.metrics(event)
            except Exception:
                _logger.failure("metrics failed on a {name} event", name=name)
        if level is not LogLevel.info or self.sessionLog or name == AUTH:
            self.publisher(event)

    # The reports (the protocol calls these) ------------------------------

    def connected(self, protocol: Any, listener: str, tls: bool) -> None:
        self._emit(LogLevel.info, CONNECT, protocol, {"listener": listener, "tls": tls})

    def tlsStarted(self, protocol: Any, version: str, resumed: bool) -> None:
        self._emit(LogLevel.info, TLS, protocol, {"version": version, "resumed": resumed})

    def rejected(
        self,
        protocol: Any,
        code: int,
        reply: str,
        command: bytes | None,
        handler: str | None,
        reason: str,
        **extra: Any,
    ) -> None:
        """
        A 4xx or 5xx reply: who (the client), what (the command, the
        envelope so far), why (the reply, the handler that chose it, a
        short reason for the metrics' label).
        """
        session = protocol.session
        verb = describeCommand(command)
        word = verb.split(" ", 1)[0].upper()
        sender: str | None = session.mailFrom if protocol._mailStarted else None
        recipients: list[str] = list(session.rcptTo)
        if word == "MAIL" and handler == "onMailFrom":
            # The sender the handler refused.
            sender = session.address
        elif word == "RCPT":
            # The recipient refused, not those accepted before it.
            recipients = [session.address] if handler == "onRcptTo" else []
        fields = {
            "code": code,
            "reply": reply,
            "command": verb,
            "verb": word or "CONNECT",
            "handler": handler,
            "reason": reason,
            "sender": sender,
            "recipients": recipients,
            "helo": session.helo,
        }
        fields.update(extra)
        self._emit(LogLevel.warn, REJECT, protocol, fields)

    def authenticated(self, protocol: Any, mechanism: str, success: bool) -> None:
        # Never the password: the user name, the mechanism, the client.
        self._emit(
            LogLevel.info if success else LogLevel.warn,
            AUTH,
            protocol,
            {"mechanism": mechanism, "username": protocol.session.username, "success": success},
        )

    def accepted(self, protocol: Any, size: int) -> None:
        session = protocol.session
        self._emit(
            LogLevel.info,
            ACCEPTED,
            protocol,
            {"sender": session.mailFrom, "recipients": list(session.rcptTo), "size": size},
        )

    def disconnected(self, protocol: Any, commands: int, messages: int, rejects: int, received: int, duration: float) -> None:
        self._emit(
            LogLevel.info,
            DISCONNECT,
            protocol,
            {"commands": commands, "messages": messages, "rejects": rejects, "bytes": received, "duration": duration},
        )

    def handlerTimed(self, protocol: Any, handler: str, seconds: float) -> None:
        if self.metrics is not None:
            self.metrics({"event": HANDLER, "handler": handler, "seconds": seconds})

    def transcript(self, protocol: Any, direction: str, line: str) -> None:
        """
        A line of the C{debug} transcript: C{<} from the client, C{>} to it
        (secrets already replaced by the caller).
        """
        self._emit(LogLevel.debug, TRANSCRIPT, protocol, {"direction": direction, "line": line})


# Writing the log (twistd infsmtp --log-format) ------------------------------

_JSON_SIMPLE = (str, int, float, bool, type(None))


def _timestamp(when: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(when)) + time.strftime("%z", time.localtime(when))


def isRotatable(path: str | None) -> bool:
    """
    Whether a log file at C{path} may be rotated (renamed, and created
    anew): a regular file or a path not there yet, not a device (such as
    C{/dev/null}), a FIFO or a socket.
    """
    try:
        return stat.S_ISREG(os.stat(path or "twistd.log").st_mode)
    except FileNotFoundError:
        return True


@implementer(ILogObserver)
class LogFileObserver:
    """
    Writes every log event to C{outFile} (text or binary, as Twisted's
    L{FileLogObserver}), one line each: C{text}, Twisted's classic form
    (time, C{[namespace#level]}, text) with the session events' text
    formatted here, without Twisted's format-string machinery; or C{json},
    one object a line with the event's simple fields (a list of recipients
    stays a list), for Loki or Elasticsearch.
    """

    def __init__(
        self, outFile: IO[Any], format: str = "text", worker: int | None = None, reactor: Any = None
    ) -> None:
        """
        @param reactor: when given, info lines logged in its thread are
            written together once per reactor turn (one write and flush
            for all the sessions' lines of that turn, rather than one each:
            under load the system calls were most of the log's cost);
            warnings and errors, and lines from other threads, are written
            at once, after those waiting.  Lines still waiting are written
            when the reactor stops.
        """
        if format not in ("text", "json"):
            raise ValueError(f"log format must be text or json, not {format!r}")
        self.outFile = outFile
        self.json = format == "json"
        self.worker = worker
        self._second = -1
        self._stamp = ""
        self._observer = FileLogObserver(outFile, self._formatSafely)
        self._reactor = reactor
        self._waiting: list[str] = []
        self._encoding = None if ioType(outFile) is str else "utf-8"
        if reactor is not None:
            reactor.addSystemEventTrigger("after", "shutdown", self.flush)

    def __call__(self, event: dict[str, Any]) -> None:
        if self._reactor is None or event.get("log_level") is not LogLevel.info or not isInIOThread():
            if self._waiting:
                self.flush()
            self._observer(event)
            return
        if not self._waiting:
            self._reactor.callLater(0, self.flush)
        self._waiting.append(self._formatSafely(event))

    def flush(self) -> None:
        """
        Write the lines waiting for the end of the reactor turn.
        """
        waiting, self._waiting = self._waiting, []
        if not waiting:
            return
        text = "".join(waiting)
        try:
            self.outFile.write(text.encode(self._encoding) if self._encoding else text)
            self.outFile.flush()
        except Exception:  # noqa: BLE001 (an observer must not raise: a full disk loses lines, not mail)
            pass

    def _time(self, when: float) -> str:
        second = int(when)
        if second != self._second:
            self._second, self._stamp = second, _timestamp(when)
        return self._stamp

    def _formatSafely(self, event: dict[str, Any]) -> str:
        try:
            return self.format(event)
        except Exception:  # noqa: BLE001 (an observer must not raise)
            return f"unformattable log event: {event!r}\n"

    def format(self, event: dict[str, Any]) -> str:
        """
        One event as the line written (newline included).
        """
        when = event.get("log_time") or time.time()
        level = event.get("log_level")
        levelName = getattr(level, "name", "info")
        namespace = event.get("log_namespace", "-")
        ours = namespace == NAMESPACE and "event" in event
        text = formatLine(event) if ours else formatEvent(event)
        failure = event.get("log_failure")
        if self.json:
            record: dict[str, Any] = {"time": self._time(when), "level": levelName, "namespace": namespace}
            if self.worker is not None:
                record["worker"] = self.worker
            for key, value in event.items():
                if key.startswith("log_") or key == "text" or key in record:
                    continue
                if isinstance(value, _JSON_SIMPLE):
                    record[key] = value
                elif isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
                    record[key] = list(value)
            record["message"] = text
            if isinstance(failure, Failure):
                record["traceback"] = failure.getTraceback()
            return json.dumps(record, ensure_ascii=False) + "\n"
        text = text.replace("\n", "\n\t")
        if isinstance(failure, Failure):
            text += "\n\t" + failure.getTraceback().rstrip("\n").replace("\n", "\n\t")
        return f"{self._time(when)} [{namespace}#{levelName}] {text}\n"
