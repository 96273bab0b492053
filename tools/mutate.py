#!/usr/bin/env python3
"""
Mutation run: does a test hold each promise?

Each mutant below is a one-line break of a promise made in SPEC, the README
or an issue (9: hardening, 16: tests that prove every promise).  For each,
this script lays out a scratch copy of the repository (the committed tree by
default), applies that one change, runs the test files that should notice,
and counts the mutant *caught* when they fail, *survived* when they pass.
It ends with ``caught/total`` and the list of survivors; the exit status is
1 when any survived.

    python tools/mutate.py                 # every mutant, the committed tree
    python tools/mutate.py --list          # what each mutant breaks
    python tools/mutate.py --only size-data-boundary,starttls-forgets-login
    python tools/mutate.py --worktree      # the working tree instead of HEAD
    python tools/mutate.py --only NAME --tests tests/x.py --verbose
                                           # does this file alone catch it?

The scratch copy imports its own ``infsmtp`` (``PYTHONPATH`` and the
working folder come first; the script checks), and twistd children started
by the tests get it too (``tests/twistdprocess.py`` puts its own checkout
on their path).  It is not a test and does not run in CI: a full run takes
a few minutes on a 2-core machine (each mutant's files run with ``-x``).
See docs/TESTING.rst.

A mutant whose original text is no longer in the source is reported
*stale* (and counted in neither column): the code moved, so its line here
needs updating.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class Mutant:
    """
    C{original} (exactly once in C{path}) becomes C{mutated}; C{tests} are
    the pytest arguments that must then fail.  Context lines in
    C{original} only make it unique: the change itself is one line.
    """

    name: str
    promise: str
    path: str
    original: str
    mutated: str
    tests: tuple[str, ...]


PROTOCOL = "infsmtp/_server/protocol.py"
OUTPUT = "infsmtp/_server/output.py"
DECISIONS = "infsmtp/_server/decisions.py"
TRANSACTION = "infsmtp/_server/transaction.py"
SASL = "infsmtp/_server/sasl.py"
WIRE = "infsmtp/_wire.py"
MAILDIR = "infsmtp/_daemon/maildir.py"
LIMITS = "infsmtp/_server/limits.py"
RECORDING = "infsmtp/testing/_recording.py"
POLICY = "infsmtp/_server/policy.py"
TLSLAYER = "infsmtp/_server/tlslayer.py"
SERVERTLS = "infsmtp/_server/tls.py"

MUTANTS = [
    # Maildir: the 250 means the message is on disk (issue 16, items 1, 4).
    Mutant(
        "maildir-fsync-file",
        "the message file is flushed before it is named in new/",
        MAILDIR,
        "    _writeAll(fd, pending)\n    os.fsync(fd)\n",
        "    _writeAll(fd, pending)\n",
        ("tests/test_maildir.py",),
    ),
    Mutant(
        "maildir-unnamed-named-before-flush",
        "a file with no name gets its name in new/ only once written and flushed",
        MAILDIR,
        "            if content is not None:\n                _writeDurably(fd, content)\n",
        "            if content is not None:\n                pass\n",
        ("tests/test_maildir.py",),
    ),
    Mutant(
        "maildir-unnamed-never-tried",
        "where O_TMPFILE works the message never goes through tmp/",
        MAILDIR,
        "            self._unnamed = self._tryUnnamed()",
        "            self._unnamed = False",
        ("tests/test_maildir.py",),
    ),
    Mutant(
        "maildir-unnamed-disk-error-is-a-verdict",
        "a full disk while trying files with no name fails that delivery, and the next one tries again",
        MAILDIR,
        "            if e.errno in _NO_UNNAMED_FILES:",
        "            if True:",
        ("tests/test_maildir.py",),
    ),
    Mutant(
        "maildir-unflushed-entry-kept",
        "a message whose new/ entry could not be flushed is taken out of new/ again",
        MAILDIR,
        '                for leftover in (os.path.join(self.path, "new", name), tmpPath):\n',
        "                for leftover in (tmpPath,):\n",
        ("tests/test_maildir.py",),
    ),
    Mutant(
        "maildir-fsync-new-dir",
        "new/ is flushed before the handler answers",
        MAILDIR,
        "            self._flushNew.flush()",
        "            pass",
        ("tests/test_maildir.py",),
    ),
    # Issue 15: a few writer threads, each storing what waited for it.
    Mutant(
        "maildir-writers-unbounded",
        "no more than `writers` threads store messages at once",
        MAILDIR,
        "            start = self._writers < self._maxWriters\n",
        "            start = True\n",
        ("tests/test_maildir.py",),
    ),
    Mutant(
        "maildir-writer-one-at-a-time",
        "messages that waited for a writer are stored together, with one flush of new/",
        MAILDIR,
        "                batch, self._waiting = self._waiting, []\n",
        "                batch, self._waiting = self._waiting[:1], self._waiting[1:]\n",
        ("tests/test_maildir.py",),
    ),
    Mutant(
        "maildir-writer-dies-on-a-bug",
        "a writer that meets an unforeseen error answers its batch and goes on",
        MAILDIR,
        "                results = self._storeAll([content for content, _ in batch])\n            except BaseException:\n",
        "                results = self._storeAll([content for content, _ in batch])\n            except ZeroDivisionError if False else ():\n",
        ("tests/test_maildir.py",),
    ),
    Mutant(
        "maildir-writer-flush-failure-ignored",
        "a failed flush of new/ fails every message of the writer's batch",
        MAILDIR,
        "                outcomes = [failure if outcome is None else outcome for outcome in outcomes]\n",
        "                pass\n",
        ("tests/test_maildir.py",),
    ),
    Mutant(
        "maildir-writer-failure-not-isolated",
        "a message the disk refuses fails alone, not the rest of its batch",
        MAILDIR,
        "                outcomes.append(Failure())\n",
        "                outcomes.append(Failure()); break  # noqa\n",
        ("tests/test_maildir.py",),
    ),
    # Issue 15: concurrent deliveries share the flush of new/ (group commit).
    Mutant(
        "maildir-group-flush-joins-running",
        "a delivery answers only after a flush of new/ that began after its link",
        MAILDIR,
        "            round = self._next\n",
        "            round = self._running or self._next\n",
        ("tests/test_maildir.py",),
    ),
    Mutant(
        "maildir-group-flush-unshared",
        "deliveries linked during a flush of new/ share the next one",
        MAILDIR,
        "                if self._running is None:\n",
        "                if True:\n",
        ("tests/test_maildir.py",),
    ),
    Mutant(
        "maildir-group-flush-error-lost",
        "a failed shared flush of new/ fails every delivery of its round",
        MAILDIR,
        "            round.error = e\n",
        "            pass\n",
        ("tests/test_maildir.py",),
    ),
    Mutant(
        "maildir-fsync-directory-body",
        "flushing a directory really calls fsync on it",
        MAILDIR,
        "    try:\n        os.fsync(fd)\n    finally:\n        os.close(fd)",
        "    try:\n        pass\n    finally:\n        os.close(fd)",
        ("tests/test_maildir.py",),
    ),
    Mutant(
        "maildir-reads-msg-whole",
        "the Maildir handler streams a spooled message from msgFile",
        MAILDIR,
        'f"Return-Path: <{session.mailFrom}>\\n".encode(), session.msgFile, crlfOnly=session._crlfOnly',
        'f"Return-Path: <{session.mailFrom}>\\n".encode(), __import__("io").BytesIO(session.msg), crlfOnly=session._crlfOnly',
        ("tests/test_maildir.py",),
    ),
    Mutant(
        "maildir-handler-msg-trusted",
        "a message a handler set is stored exactly: a bare CR in it stays",
        "infsmtp/_server/session.py",
        "        self._crlfOnly = False\n",
        "        self._crlfOnly = True\n",
        ("tests/test_maildir.py",),
    ),
    Mutant(
        "maildir-short-write-lost",
        "a short write is resumed where the kernel stopped",
        MAILDIR,
        "            views[0] = views[0][written:]\n",
        "            del views[0]\n",
        ("tests/test_maildir.py",),
    ),
    Mutant(
        "maildir-disk-error-fails-open",
        "a disk that refuses the message is answered 451, never 250",
        MAILDIR,
        "            raise SMTPError(*_DISK_REFUSED)",
        "            return True",
        ("tests/test_maildir.py",),
    ),
    # STARTTLS (RFC 3207 4.2, CVE-2011-0411).
    Mutant(
        "starttls-forgets-login",
        "STARTTLS forgets a login made before it",
        PROTOCOL,
        '        self.session.authenticated = False\n        if getattr(self.transport, "simulatesTLS", False):',
        '        if getattr(self.transport, "simulatesTLS", False):',

        ("tests/test_protocol.py",),
    ),
    Mutant(
        "starttls-forgets-helo",
        "STARTTLS forgets the EHLO: the client must greet again",
        PROTOCOL,
        '        self.session.helo = ""\n        self._ehlo = False\n        self.session.authenticated = False',
        "        self._ehlo = False\n        self.session.authenticated = False",
        ("tests/test_protocol.py",),
    ),
    Mutant(
        "starttls-keeps-injected-commands",
        "commands pipelined behind STARTTLS are discarded",
        PROTOCOL,
        "        self._framer.clear()\n        self._resetTransaction()\n        self.session.helo",
        "        self._resetTransaction()\n        self.session.helo",
        ("tests/test_protocol.py", "tests/interop/test_hostile.py"),
    ),
    # Sizes and numbers from the wire.
    Mutant(
        "size-data-boundary",
        "a message of exactly maxMessageSize bytes is accepted",
        WIRE,
        "        self.size += len(chunk)\n        if self.maxSize is not None and self.size > self.maxSize:",
        "        self.size += len(chunk)\n        if self.maxSize is not None and self.size >= self.maxSize:",
        ("tests/test_protocol.py", "tests/test_wire.py"),
    ),
    Mutant(
        "size-data-unbounded",
        "a message over maxMessageSize is refused 552",
        WIRE,
        "        self.size += len(chunk)\n        if self.maxSize is not None and self.size > self.maxSize:",
        "        self.size += len(chunk)\n        if False:",
        ("tests/test_protocol.py", "tests/test_wire.py"),
    ),
    Mutant(
        "size-parameter-boundary",
        "MAIL FROM SIZE= exactly at the limit is accepted",
        TRANSACTION,
        "if settings.maxMessageSize and size > settings.maxMessageSize:",
        "if settings.maxMessageSize and size >= settings.maxMessageSize:",
        ("tests/test_protocol.py",),
    ),
    Mutant(
        "size-parameter-unicode-digits",
        "every number from the wire is ASCII digits",
        WIRE,
        "or not text.isascii() or not text.isdigit():",
        "or not text.isdigit():",
        ("tests/test_wire.py", "tests/test_protocol.py", "tests/test_hardening.py"),
    ),
    Mutant(
        "bare-lf-accepted",
        "a bare LF in DATA marks the message refused (SMTP smuggling)",
        WIRE,
        'if b"\\r" in joined or b"\\n" in joined:',
        'if b"\\r" in joined:',
        ("tests/test_wire.py", "tests/test_protocol.py", "tests/interop/test_hostile.py"),
    ),
    Mutant(
        "command-line-unbounded",
        "a command line over the limit is answered 500, not buffered",
        WIRE,
        "        if self._discarding or end >= self.maxLength:",
        "        if self._discarding:",
        ("tests/test_wire.py", "tests/test_protocol.py"),
    ),
    Mutant(
        "command-line-limit-off-by-one",
        "maxLineLength counts the line ending",
        WIRE,
        "        if self._discarding or end >= self.maxLength:",
        "        if self._discarding or end > self.maxLength:",
        ("tests/test_hardening.py",),
    ),
    Mutant(
        "too-many-recipients",
        "maxRecipients recipients are accepted, the next is 452",
        TRANSACTION,
        "if len(self.session.rcptTo) >= settings.maxRecipients:",
        "if len(self.session.rcptTo) > settings.maxRecipients:",
        ("tests/test_protocol.py",),
    ),
    Mutant(
        "too-many-errors",
        "maxErrors errors close the session with 421",
        OUTPUT,
        "if self._errors >= self.factory.settings.maxErrors:",
        "if self._errors > self.factory.settings.maxErrors:",
        ("tests/test_protocol.py", "tests/interop/test_handlers.py"),
    ),
    # AUTH.
    Mutant(
        "auth-over-plaintext",
        "AUTH needs TLS unless insecure AUTH is allowed (538)",
        SASL,
        "if not self.session.secure and not self.factory.settings.allowInsecureAuth:",
        "if False:",
        ("tests/test_protocol.py",),
    ),
    Mutant(
        "require-auth-ignored",
        "requireAuth: MAIL before AUTH is 530",
        TRANSACTION,
        "if settings.requireAuth and not self.session.authenticated:",
        "if False:",
        ("tests/test_protocol.py",),
    ),
    # Handlers fail closed (SPEC: Server, handlers).
    Mutant(
        "handler-string-result-accepts",
        "a handler result that is not None or a bool is never an acceptance",
        DECISIONS,
        "        if type(outcome) is bool:\n            apply(outcome)",
        "        if type(outcome) in (bool, str):\n            apply(outcome)",
        ("tests/test_protocol.py", "tests/test_hardening.py", "tests/interop/test_handlers.py"),
    ),
    Mutant(
        "handler-decision-field-truthy",
        "a decision field that is not a bool is a programming error (4xx)",
        DECISIONS,
        "            if type(value) is bool or (value is None and name in _MAY_ABSTAIN):\n                apply(None)",
        "            if type(value) is bool or value or (value is None and name in _MAY_ABSTAIN):\n                apply(None)",
        ("tests/test_protocol.py", "tests/test_hardening.py", "tests/interop/test_handlers.py"),
    ),
    Mutant(
        "handler-exception-accepts",
        "a handler that raises is answered 4xx, never accepted",
        DECISIONS,
        '            log.failure("{handler} handler failed for session {id}", outcome, handler=name, id=self.session.id)\n'
        "            self._temporary(temporary, name)",
        '            log.failure("{handler} handler failed for session {id}", outcome, handler=name, id=self.session.id)\n'
        "            apply(True)",
        ("tests/test_protocol.py", "tests/interop/test_handlers.py"),
    ),
    Mutant(
        "handler-deadline-ignored",
        "a handler that does not answer within its deadline is answered 4xx",
        DECISIONS,
        "pending.timer = self._clock.callLater(deadline, self._handlerTimedOut, pending, deadline)",
        "pending.timer = self._clock.callLater(deadline * 1e6, self._handlerTimedOut, pending, deadline)",
        ("tests/test_protocol.py", "tests/test_hardening.py"),
    ),
    Mutant(
        "pipelined-commands-run-ahead",
        "commands behind a pending handler wait for its answer, in order",
        PROTOCOL,
        "        while not self._busy and not self._closing and self._dataFramer is None and not self._writeBlocked:",
        "        while not self._closing and self._dataFramer is None and not self._writeBlocked:",
        ("tests/test_protocol.py", "tests/interop/test_handlers.py"),
    ),
    # Bounded under attack (issue 9).
    Mutant(
        "per-client-sessions-unbounded",
        "one client IP cannot hold more than maxConnectionsPerClient sessions",
        LIMITS,
        "if self.maxSessions and client.sessions >= self.maxSessions:",
        "if self.maxSessions and client.sessions > self.maxSessions:",
        ("tests/test_hardening.py", "tests/interop/test_attack.py"),
    ),
    Mutant(
        "per-client-rate-unbounded",
        "a client over maxConnectionRate is refused",
        LIMITS,
        "            if client.tokens < 1:",
        "            if client.tokens < 0:",
        ("tests/test_hardening.py", "tests/interop/test_attack.py"),
    ),
    Mutant(
        "ipv6-clients-one-per-address",
        "an IPv6 client is counted by its /64",
        LIMITS,
        "    return str(ipaddress.IPv6Network((int(address) >> 64 << 64, 64)))",
        "    return str(address)",
        ("tests/test_hardening.py",),
    ),
    Mutant(
        "memory-budget-unbounded",
        "the memory all sessions hold together is bounded",
        LIMITS,
        "if self.limit is not None and self.used + size > self.limit:",
        "if False:",
        ("tests/test_hardening.py", "tests/interop/test_attack.py"),
    ),
    Mutant(
        "trickled-line-keeps-session",
        "a command line must be complete within the idle timeout",
        PROTOCOL,
        "            if framer.lines != lines:\n                self._lastInput = now",
        "            if True:\n                self._lastInput = now",
        ("tests/test_hardening.py", "tests/interop/test_attack.py"),
    ),
    Mutant(
        "data-rate-unbounded",
        "DATA bytes buy time only at the minimum data rate",
        PROTOCOL,
        "            credit = self._lastInput + len(data) * self._perByte",
        "            credit = now",
        ("tests/test_hardening.py", "tests/interop/test_attack.py"),
    ),
    Mutant(
        "backpressure-ignored",
        "a client that does not read its replies is no longer read from",
        OUTPUT,
        "        self._writeBlocked = True\n        self._updateReading()",
        "        self._writeBlocked = False\n        self._updateReading()",
        ("tests/test_hardening.py", "tests/interop/test_attack.py"),
    ),
    Mutant(
        "max-connections-off-by-one",
        "maxConnections sessions at most; the next is 421",
        "infsmtp/_server/server.py",
        "if len(self.sessions) >= self.server.maxConnections:",
        "if len(self.sessions) > self.server.maxConnections:",
        ("tests/test_protocol.py", "tests/test_hardening.py"),
    ),
    # onDisconnect exactly once.
    Mutant(
        "ondisconnect-not-awaited",
        "stopListening() waits for every onDisconnect to finish",
        PROTOCOL,
        "                d.addBoth(lambda _: (session._release(), self.factory.release(self)))",
        "                self.factory.release(self); d.addBoth(lambda _: session._release())",
        ("tests/test_lifecycle.py", "tests/interop/test_handlers.py"),
    ),
    # TLS versions (issue 16: a refusal is a protocol_version alert).
    Mutant(
        "tls-max-protocol-ignored",
        "maxProtocol caps the TLS version a client gets",
        "infsmtp/_server/tls.py",
        "        context.maximum_version = _STDLIB_VERSION[maxProtocol]",
        "        context.maximum_version = _STDLIB_VERSION[TLSVersion.tls1_3]",
        ("tests/test_tls.py",),
    ),
    Mutant(
        "tls-min-protocol-ignored",
        "minProtocol refuses older TLS versions",
        "infsmtp/_server/tls.py",
        "        context.minimum_version = _STDLIB_VERSION[minProtocol]",
        "        context.minimum_version = _STDLIB_VERSION[TLSVersion.tls1_2]",
        ("tests/test_tls.py",),
    ),
    Mutant(
        "handler-disconnect-silent",
        "session.disconnect() answers the command in progress 421",
        PROTOCOL,
        '        self._reply(421, f"{self.factory.settings.hostname} Closing connection", "4.7.0", reason="disconnect")',
        "        pass",
        ("tests/interop/test_handlers.py",),
    ),
    # MAIL parameters (issue 16: the parser test asserts exact results).
    Mutant(
        "mail-parameter-keyword-case",
        "MAIL parameter keywords come back upper-cased",
        WIRE,
        '            parameters[keyword.decode("ascii").upper()] = text',
        '            parameters[keyword.decode("ascii")] = text',
        ("tests/test_wire.py",),
    ),
    # The transport writer (issue 16: a lost byte must fail, not hang).
    Mutant(
        "writenow-drops-a-byte",
        "writeNow sends every byte, in order",
        "infsmtp/_writenow.py",
        "        data = data[sent:]",
        "        data = data[sent + 1 :]",
        ("tests/test_writenow.py",),
    ),
    # The client.
    Mutant(
        "client-reply-size-unbounded",
        "the client bounds a server's reply",
        "infsmtp/_client/protocol.py",
        "        if size > MAX_REPLY_SIZE:",
        "        if False:",
        ("tests/test_client_unit.py", "tests/test_client_hostile.py"),
    ),
    Mutant(
        "client-reply-code-range",
        "a reply code is 2yz to 5yz with y in 0-5",
        "infsmtp/_client/protocol.py",
        '        if digits[1:2] in b"012345":',
        '        if digits[1:2] in b"0123456789":',
        ("tests/test_client_unit.py",),
    ),
    Mutant(
        "client-sends-bcc",
        "Bcc is never transmitted",
        "infsmtp/_client/envelope.py",
        'HIDDEN_FIELDS = ("bcc", "resent-bcc")',
        'HIDDEN_FIELDS = ("resent-bcc",)',
        ("tests/test_client_unit.py", "tests/test_client_interop.py"),
    ),
    # Client TLS options and OAuth2 (issue 11, items 6 and 11).
    Mutant(
        "client-opportunistic-ignores-starttls",
        "opportunistic uses STARTTLS whenever the server offers it",
        "infsmtp/_client/client.py",
        '                mode == EncryptMode.opportunistic and "STARTTLS" in protocol.extensions',
        "                mode == EncryptMode.opportunistic and False",
        ("tests/test_client_tlsoptions.py",),
    ),
    Mutant(
        "client-tls-hangup-looks-like-lost-connection",
        "a server hanging up during the handshake is an SMTPTLSError",
        "infsmtp/_client/protocol.py",
        "        if error.code is not None or error.text == CLOSED_BY_CLIENT or not ISSLTransport.providedBy(self.transport):",
        "        if True:",
        ("tests/test_client_tlsoptions.py",),
    ),
    Mutant(
        "client-certificate-not-shown",
        "certFile/keyFile are the certificate the server sees",
        "infsmtp/_client/tls.py",
        "        extra.update(privateKey=key, certificate=chain[0], extraCertChain=chain[1:])",
        "        pass",
        ("tests/test_client_tlsoptions.py",),
    ),
    Mutant(
        "client-max-protocol-ignored",
        "maxProtocol caps the TLS version",
        "infsmtp/_client/tls.py",
        '        "lowerMaximumSecurityTo": maximumVersion.twisted,',
        '        "lowerMaximumSecurityTo": TLSVersion.tls1_3.twisted,',
        ("tests/test_client_tlsoptions.py",),
    ),
    Mutant(
        "client-protocol-range-upside-down",
        "minProtocol above maxProtocol is an error before connecting",
        "infsmtp/_client/tls.py",
        "    if minimumVersion > maximumVersion:",
        "    if False:",
        ("tests/test_client_tlsoptions.py",),
    ),
    Mutant(
        "client-own-creator-conflict-ignored",
        "tlsConnectionCreator with another TLS setting is an error",
        "infsmtp/_client/tls.py",
        "        if changed:",
        "        if False:",
        ("tests/test_client_tlsoptions.py",),
    ),
    Mutant(
        "client-server-hostname-ignored",
        "serverHostname is what TLS verifies",
        "infsmtp/_client/tls.py",
        "        client.serverHostname or client.host,",
        "        client.host,",
        ("tests/test_client_tlsoptions.py",),
    ),
    Mutant(
        "client-oauth-no-refresh",
        "a refused token is refreshed and tried once more",
        "infsmtp/_client/protocol.py",
        "            if reply.code != 535 or refresh or not tokens.refreshable:",
        "            if True:",
        ("tests/test_client_oauth.py",),
    ),
    Mutant(
        "client-oauthbearer-error-answer",
        "OAUTHBEARER answers the error challenge with ^A (RFC 7628 3.2.3)",
        "infsmtp/_client/protocol.py",
        '            return b"\\x01"',
        '            return b""',
        ("tests/test_client_oauth.py",),
    ),
    Mutant(
        "client-token-not-redacted",
        "a token never appears in an error",
        "infsmtp/_client/protocol.py",
        "            self._secrets.append(token)",
        "            pass",
        ("tests/test_client_oauth.py",),
    ),
    Mutant(
        "client-token-characters-unchecked",
        "a provider's token holds only RFC 6750 characters",
        "infsmtp/_client/oauth.py",
        "        if _B64TOKEN.fullmatch(result) is None:",
        "        if False:",
        ("tests/test_client_oauth.py",),
    ),
    Mutant(
        "client-lmtp-one-final-reply",
        "in LMTP the end of a message gets one reply per accepted recipient",
        "infsmtp/_client/protocol.py",
        "        if not self._lmtp:\n            return 1\n",
        "        if True:\n            return 1\n",
        ("tests/test_client_lmtp.py",),
    ),
    Mutant(
        "client-lmtp-ehlo",
        "an LMTP client says LHLO",
        "infsmtp/_client/protocol.py",
        '            reply = await self.command(b"LHLO " + self.identity)',
        '            reply = await self.command(b"EHLO " + self.identity)',
        ("tests/test_client_lmtp.py",),
    ),
    Mutant(
        "client-bdat-never",
        "the client sends with BDAT when the server offers CHUNKING",
        "infsmtp/_client/protocol.py",
        '        if self._chunking and "CHUNKING" in extensions:',
        "        if False:",
        ("tests/test_client_postfix.py",),
    ),
    Mutant(
        "client-bdat-stuffs-dots",
        "BDAT content is counted, not dot-stuffed",
        "infsmtp/_client/protocol.py",
        "        lines = DotStuffer(dots=False)\n        content = ",
        "        lines = DotStuffer(dots=True)\n        content = ",
        ("tests/test_client_postfix.py",),
    ),
    Mutant(
        "client-bdat-goes-on-after-refusal",
        "no chunk is sent after the server refused one",
        "infsmtp/_client/protocol.py",
        "        if self.refusal is not None:\n            self._protocol.transport.unregisterProducer()",
        "        if False:\n            self._protocol.transport.unregisterProducer()",
        ("tests/test_client_postfix.py",),
    ),
    Mutant(
        "client-bdat-unbounded-window",
        "BDAT chunks in flight stay few, so a refusal stops the message soon",
        "infsmtp/_client/protocol.py",
        "        if self._unanswered >= MAX_CHUNKS_UNANSWERED:",
        "        if False:",
        ("tests/test_client_postfix.py",),
    ),
    Mutant(
        "client-rcpt-options-for-a-stranger",
        "per-recipient options naming no recipient are refused, not dropped",
        "infsmtp/_client/protocol.py",
        "    if unknown:\n        raise SMTPError(f\"rcptOptions names",
        "    if False:\n        raise SMTPError(f\"rcptOptions names",
        ("tests/test_client_postfix.py",),
    ),
    Mutant(
        "client-requiretls-unchecked",
        "REQUIRETLS goes only over TLS to a server that offers it (RFC 8689)",
        "infsmtp/_client/protocol.py",
        '                if "REQUIRETLS" in given:',
        "                if False:",
        ("tests/test_client_postfix.py",),
    ),
    Mutant(
        "client-sendfile-drops-options",
        "sendFile passes its MAIL and RCPT options on",
        "infsmtp/_client/client.py",
        "            sent = self._sendStream(stream, sender, recipients, mailOptions, rcptOptions)",
        "            sent = self._sendStream(stream, sender, recipients)",
        ("tests/test_client_postfix.py",),
    ),
    Mutant(
        "client-bdat-no-rset-after-refusal",
        "after a refused chunk the next transaction starts with RSET",
        "infsmtp/_client/protocol.py",
        "            # The transaction is over, but only RSET says so for sure.\n            self._inTransaction = True",
        "            # The transaction is over, but only RSET says so for sure.\n            self._inTransaction = False",
        ("tests/test_client_postfix.py",),
    ),
    Mutant(
        "deliver-lmtp-ignored",
        "twistd infsmtp --deliver lmtp:ENDPOINT delivers into the store",
        "infsmtp/_daemon/twistd.py",
        "            handlers[\"onReceive\"] = _lmtpDelivery(options)",
        "            pass",
        ("tests/test_deliver_lmtp.py",),
    ),
    Mutant(
        "deliver-lmtp-speaks-smtp",
        "LMTPDelivery speaks LMTP",
        "infsmtp/_daemon/relay.py",
        "            endpoint=endpoint,\n            lmtp=True,",
        "            endpoint=endpoint,\n            lmtp=False,",
        ("tests/test_deliver_lmtp.py",),
    ),
    Mutant(
        "sni-never-chooses",
        "a client asking for a name by SNI gets that name's certificate",
        "infsmtp/_server/tls.py",
        "            connection.context = options",
        "            pass",
        ("tests/test_sni.py",),
    ),
    Mutant(
        "sni-live-name-ignored",
        "a name's certificate set on a running server serves the next connection",
        "infsmtp/_server/server.py",
        "                sessions.setNamed(name, options)",
        "                pass",
        ("tests/test_sni.py",),
    ),
    Mutant(
        "sni-wrong-certificate-accepted",
        "a certificate not valid for its name is refused at once",
        "infsmtp/_server/server.py",
        "            checkCertificateNames(certFile, name)",
        "            pass",
        ("tests/test_sni.py",),
    ),
    Mutant(
        "bdat-refused-chunk-run-as-commands",
        "a refused chunk's octets are read as data, never run as commands",
        TRANSACTION,
        "        if size:\n            self._dataFramer = framer",
        "        if size and refusal is None:\n            self._dataFramer = framer",
        ("tests/test_server_chunking.py",),
    ),
    Mutant(
        "bdat-size-unchecked",
        "a message in chunks over maxMessageSize is refused 552 and not kept",
        WIRE,
        "                self.fault = TOO_BIG\n            else:\n                self.sink.write(piece)",
        "                self.sink.write(piece)\n            else:\n                self.sink.write(piece)",
        ("tests/test_server_chunking.py",),
    ),
    Mutant(
        "bdat-then-data",
        "DATA after a BDAT chunk of the same message is refused (RFC 3030)",
        TRANSACTION,
        "        if self._sink is not None:\n            # RFC 3030 2",
        "        if False:\n            # RFC 3030 2",
        ("tests/test_server_chunking.py",),
    ),
    Mutant(
        "lmtp-one-reply-for-all",
        "an LMTP server answers a failing onReceive once per recipient",
        DECISIONS,
        "        return len(self.session.rcptTo) if name == \"onReceive\" and self._lmtp else 1",
        "        return 1",
        ("tests/test_server_chunking.py",),
    ),
    Mutant(
        "dsn-rcpt-unchecked",
        "a malformed NOTIFY or ORCPT is answered 501",
        TRANSACTION,
        "                dsn = parseRcptDSN(params)",
        "                dsn = {}",
        ("tests/test_server_chunking.py",),
    ),
    Mutant(
        "dsn-mail-parameters-late",
        "onMailFrom sees the MAIL's parameters",
        TRANSACTION,
        "        if name == \"onMailFrom\":\n            session.mailParameters = params",
        "        if False:\n            session.mailParameters = params",
        ("tests/test_server_chunking.py",),
    ),
    Mutant(
        "lmtp-delivery-one-fate",
        "behind an LMTP server, each recipient gets the store's own reply",
        "infsmtp/_daemon/relay.py",
        "            session.rcptResults[address] = SMTPError(code, text)",
        "            pass",
        ("tests/test_deliver_lmtp.py",),
    ),
    Mutant(
        "bdat-bare-cr-dropped",
        "a chunked message keeps a bare CR in the Maildir (only DATA's framing vouches for CRLF)",
        TRANSACTION,
        "        self._messageReceived(sink, crlfOnly=False)",
        "        self._messageReceived(sink)",
        ("tests/test_server_chunking.py",),
    ),
    Mutant(
        "workers-reuseport-shared-anyway",
        "with --workers-sockets reuseport each worker adopts its own socket only",
        "infsmtp/_daemon/workers.py",
        "        for sock in self.socketsOf[index]:",
        "        for sock in self.sockets:",
        ("tests/test_workers.py",),
    ),
    Mutant(
        "workers-reuseport-not-set",
        "the per-worker sockets share their port through SO_REUSEPORT",
        "infsmtp/_daemon/workers.py",
        "        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)",
        "        pass",
        ("tests/test_workers.py",),
    ),
    Mutant(
        "log-device-rotated",
        "a --logfile that is not a regular file (/dev/null, a FIFO) is never rotated away",
        "infsmtp/_daemon/twistd.py",
        "    elif not isRotatable(name):",
        "    elif False:",
        ("tests/test_logfile.py",),
    ),
    Mutant(
        "workers-log-device-suffixed",
        "workers share a parent log that is not a regular file, never LOG.workerN beside a device",
        "infsmtp/_daemon/workers.py",
        "        elif isRotatable(self.logfile):",
        "        elif True:",
        ("tests/test_logfile.py",),
    ),
    # The testing kit (issue 13): what the smtpd fixture records and the
    # faults it injects, the plugin's behaviour, the development sink.
    Mutant(
        "kit-records-refused-message",
        "a message is recorded only once onReceive accepted it",
        RECORDING,
        "        if accepted is True:\n            self._record(session)",
        "        if True:\n            self._record(session)",
        ("tests/test_testing_server.py",),
    ),
    Mutant(
        "kit-fault-times-ignored",
        "fail(..., times=N) fails N matching commands, then lets them through",
        RECORDING,
        "                        rule.remaining -= 1",
        "                        pass",
        ("tests/test_testing_server.py",),
    ),
    Mutant(
        "kit-fault-address-ignored",
        "fail(command, address) fails only that address",
        RECORDING,
        "        return self.address is None or self.address in addresses",
        "        return True",
        ("tests/test_testing_server.py",),
    ),
    Mutant(
        "kit-failafter-off-by-one",
        "failAfter(n): n messages per session, then the MAIL is refused",
        RECORDING,
        "session.data.get(_COUNT_KEY, 0) >= limit[0]:",
        "session.data.get(_COUNT_KEY, 0) > limit[0]:",
        ("tests/test_testing_server.py",),
    ),
    Mutant(
        "kit-no-cut-mid-data",
        "disconnectDuring('DATA') cuts the connection once the message has begun",
        RECORDING,
        "        if self._cutMessage and self._dataFramer is not None:",
        "        if False:",
        ("tests/test_testing_server.py",),
    ),
    Mutant(
        "kit-waitfor-count-early",
        "waitFor(n) waits for n messages",
        RECORDING,
        "            return list(self._messages) if len(self._messages) >= what else None",
        "            return list(self._messages) if len(self._messages) >= what - 1 else None",
        ("tests/test_testing_server.py",),
    ),
    Mutant(
        "kit-tls-not-recorded",
        "a message says which TLS protected it",
        RECORDING,
        '        message.tls = (session.tlsVersion or "TLS") if session.secure else None',
        "        message.tls = None",
        ("tests/test_testing_server.py",),
    ),
    Mutant(
        "kit-any-password",
        "users={...}: a login is checked against them",
        RECORDING,
        "            return users is not None and users.get(session.username) == session.password",
        "            return users is not None",
        ("tests/test_testing_server.py",),
    ),
    Mutant(
        "kit-sync-test-under-pytest-twisted",
        "under pytest-twisted a synchronous test using smtpd fails at once, not hangs",
        "infsmtp/testing/pytest_plugin.py",
        "        if not _isAsynchronousTest(request.function):",
        "        if False:",
        ("tests/test_testing_plugin.py",),
    ),
    Mutant(
        "kit-plugin-imports-twisted",
        "loading the pytest plugin imports no Twisted (installs no reactor)",
        "infsmtp/testing/__init__.py",
        "from .._lazy import lazyNames\n",
        "from .._lazy import lazyNames; import twisted.internet.reactor  # noqa\n",
        ("tests/test_testing_plugin.py",),
    ),
    Mutant(
        "sink-print-with-maildir",
        "twistd --print refuses --maildir and --relay",
        "infsmtp/_daemon/twistd.py",
        '    if options["print"] and (options["relay"] or options["maildir"]):',
        "    if False:",
        ("tests/test_devsink.py",),
    ),
    Mutant(
        "sink-no-body",
        "the sink prints the body, readable",
        "infsmtp/_daemon/printer.py",
        "        lines.append(_text(body).rstrip())",
        "        pass",
        ("tests/test_devsink.py",),
    ),
    # The session log, metrics and health (issue 12).
    Mutant(
        "reject-4xx-not-logged",
        "every 4xx and 5xx reply the server sends is a reject event",
        OUTPUT,
        "        if code >= 400:\n            self._refused(code, reason)",
        "        if code >= 500:\n            self._refused(code, reason)",
        ("tests/test_observe.py",),
    ),
    Mutant(
        "auth-failure-not-logged",
        "a failed login is an auth event fail2ban can match",
        SASL,
        "        self._rejects += 1\n        self._events.authenticated(self, self._mechanism, False)",
        "        self._rejects += 1",
        ("tests/test_observe.py", "tests/test_observe_twistd.py"),
    ),
    Mutant(
        "auth-event-logs-the-password",
        "an auth event names the user, never the password",
        "infsmtp/_events.py",
        '{"mechanism": mechanism, "username": protocol.session.username, "success": success},',
        '{"mechanism": mechanism, "username": protocol.session.password, "success": success},',
        ("tests/test_observe.py",),
    ),
    Mutant(
        "debug-shows-auth-initial-response",
        "the transcript replaces an AUTH initial response by ***",
        PROTOCOL,
        '(" ***" if len(parts) > 2 else "")',
        '(" " + parts[2].decode() if len(parts) > 2 else "")',
        ("tests/test_observe.py",),
    ),
    Mutant(
        "data-reject-without-queue-id",
        "a message refused at the end of DATA is logged with its queue id",
        TRANSACTION,
        "            # Replied before the reset: the log line names the message.",
        "            self._resetTransaction()",
        ("tests/test_observe.py",),
    ),
    Mutant(
        "log-line-not-escaped",
        "control characters from the wire are escaped in log lines",
        "infsmtp/_events.py",
        "    if not text.isprintable():",
        "    if False:",
        ("tests/test_observe.py",),
    ),
    Mutant(
        "metrics-accepted-uncounted",
        "/metrics counts every accepted message",
        "infsmtp/_server/metrics.py",
        "            self.accepted.inc()",
        "            pass",
        ("tests/test_observe.py", "tests/test_observe_twistd.py"),
    ),
    Mutant(
        "healthz-ignores-shutdown",
        "/healthz answers 503 while the server is stopping",
        "infsmtp/_server/server.py",
        "        if self._stopping:",
        "        if False:",
        ("tests/test_observe.py",),
    ),
    Mutant(
        "worker-session-ids-collide",
        "workers number their sessions apart",
        "infsmtp/_server/server.py",
        "        self._sessionIds = itertools.count(index + 1, count)",
        "        self._sessionIds = itertools.count(1)",
        ("tests/test_observe.py", "tests/test_observe_twistd.py"),
    ),
    Mutant(
        "twistd-session-log-off",
        "twistd infsmtp writes every session's lines",
        "infsmtp/_daemon/twistd.py",
        "            sessionLog=True,",
        "            sessionLog=False,",
        ("tests/test_observe_twistd.py",),
    ),
    Mutant(
        "sd-notify-ready-missing",
        "under systemd, READY=1 is sent once listening",
        "infsmtp/_daemon/twistd.py",
        '            # Under systemd (Type=notify): listening, so ready.\n            self._reactor.callWhenRunning(sdNotify, "READY=1")',
        "            # Under systemd (Type=notify): listening, so ready.",
        ("tests/test_observe_twistd.py",),
    ),
    Mutant(
        "client-debug-shows-password",
        "the client transcript replaces an AUTH initial response by ***",
        "infsmtp/_client/debug.py",
        '                text = " ".join(parts[:2]) + (" ***" if len(parts) > 2 else "")',
        '                text = " ".join(parts)',
        ("tests/test_observe.py",),
    ),
    # Policy controls (issue 14, item 5).
    Mutant(
        "requirestarttls-mail-allowed",
        "with requireStartTls, MAIL before STARTTLS is answered 530",
        TRANSACTION,
        "        if settings.requireStartTls and not self.session.secure:",
        "        if False:",
        ("tests/test_policy.py", "tests/interop/test_policy_clients.py"),
    ),
    Mutant(
        "requirestarttls-auth-allowed",
        "with requireStartTls, AUTH before STARTTLS is answered 530",
        SASL,
        "        if self.factory.settings.requireStartTls and not self.session.secure:",
        "        if False:",
        ("tests/test_policy.py",),
    ),
    Mutant(
        "requirestarttls-insecure-auth-offered",
        "with requireStartTls, AUTH is never offered before TLS",
        "infsmtp/_server/server.py",
        "            allowInsecureAuth=self.allowInsecureAuth and not self.requireStartTls,",
        "            allowInsecureAuth=self.allowInsecureAuth,",
        ("tests/test_policy.py",),
    ),
    Mutant(
        "requirestarttls-without-tls-accepted",
        "requireStartTls without ssl is refused at construction",
        "infsmtp/_server/server.py",
        "        if self.requireStartTls and not self.ssl:",
        "        if False:",
        ("tests/test_policy.py",),
    ),
    Mutant(
        "banner-crlf-accepted",
        "a banner with CR/LF (a reply injection) is refused",
        "infsmtp/_server/server.py",
        '_BANNER = re.compile(r"[\\x20-\\x7e]{0,200}")',
        '_BANNER = re.compile(r"[\\x20-\\x7e\\r\\n]{0,200}")',
        ("tests/test_policy.py",),
    ),
    Mutant(
        "banner-ignored",
        "the greeting carries the configured banner",
        PROTOCOL,
        "            self._reply(220, self.factory.settings.greeting)",
        '            self._reply(220, f"{self.factory.settings.hostname} ESMTP infsmtp")',
        ("tests/test_policy.py", "tests/interop/test_policy_clients.py"),
    ),
    Mutant(
        "pregreet-ignored",
        "a client talking before the delayed greeting is answered 554 and closed",
        POLICY,
        "        self.dataReceived = self._talkedFirst  # type: ignore[method-assign]",
        "        pass",
        ("tests/test_policy.py", "tests/interop/test_policy_clients.py"),
    ),
    Mutant(
        "pregreet-no-delay",
        "with greetDelay, the greeting waits",
        PROTOCOL,
        "        if self.factory.settings.greetDelay:",
        "        if False:",
        ("tests/test_policy.py",),
    ),
    Mutant(
        "pregreet-during-onconnect-ignored",
        "talk while onConnect decides after the delay is pregreet too (its late answer ignored)",
        POLICY,
        "        pending, self._pending = self._pending, None\n        if pending is not None:\n            # onConnect",
        "        pending = None\n        if pending is not None:\n            # onConnect",
        ("tests/test_policy.py",),
    ),
    Mutant(
        "pregreet-idle-from-connect",
        "after a greeting delay the idle deadline counts from the greeting",
        POLICY,
        "        self._lastInput = self._seconds()\n        self._decide(\"onConnect\"",
        "        self._decide(\"onConnect\"",
        ("tests/test_policy.py",),
    ),
    Mutant(
        "pregreet-unlogged",
        "a pregreet reject is logged with reason=pregreet",
        POLICY,
        '        self._reply(554, "Protocol error: talked before the greeting", "5.5.1", reason="pregreet")',
        '        self._out.append(b"554 5.5.1 Protocol error: talked before the greeting\\r\\n")',
        ("tests/test_policy.py",),
    ),
    Mutant(
        "onehlo-auth-withdrawal-ignored",
        "an AUTH that onEhlo removed is refused when sent anyway",
        SASL,
        '        if self._withdrawnBy("AUTH"):',
        "        if False:",
        ("tests/test_policy.py", "tests/interop/test_policy_clients.py"),
    ),
    Mutant(
        "onehlo-starttls-withdrawal-ignored",
        "a STARTTLS that onEhlo removed is refused when sent anyway",
        PROTOCOL,
        '        if self._withdrawnBy("STARTTLS"):',
        "        if False:",
        ("tests/test_policy.py",),
    ),
    Mutant(
        "onehlo-params-crlf",
        "an extension's parameters from onEhlo cannot inject reply lines",
        POLICY,
        '_PARAMS = re.compile(r"[\\x21-\\x7e]+(?: [\\x21-\\x7e]+)*")',
        '_PARAMS = re.compile(r"[^ ]+(?: [^ ]+)*", re.S)',
        ("tests/test_policy.py",),
    ),
    Mutant(
        "onehlo-refusal-keeps-helo",
        "a refused EHLO leaves the client un-greeted",
        POLICY,
        '            self.session.helo = ""\n            self._ehlo = False',
        "            self._ehlo = False",
        ("tests/test_policy.py",),
    ),
    Mutant(
        "onehlo-not-called",
        "EHLO asks onEhlo when it is set",
        PROTOCOL,
        '        if self._handlers["onEhlo"] is not None:',
        "        if False:",
        ("tests/test_policy.py", "tests/interop/test_policy_clients.py"),
    ),
    Mutant(
        "onvrfy-abstain-fails-open",
        "an onVrfy that says nothing answers 252, never 250",
        POLICY,
        "        if known is True:",
        "        if known is not False:",
        ("tests/test_policy.py",),
    ),
    Mutant(
        "onvrfy-wrong-result-accepted",
        "an onVrfy result that is not None/True/False is 451, never a 250",
        DECISIONS,
        "            if type(value) is bool or (value is None and name in _MAY_ABSTAIN):",
        "            if True:",
        ("tests/test_policy.py",),
    ),
    Mutant(
        "tls-close-notify-drops-replies",
        "a client's close_notify still gets the replies to what it sent before it",
        TLSLAYER,
        "                    self._deliverAll(chunks)\n                    self._flush()",
        "                    self._deliverAll(chunks)\n                    pass",
        ("tests/test_tlslayer.py",),
    ),
    Mutant(
        "tls-close-notify-ignored",
        "a client's close_notify ends the connection",
        TLSLAYER,
        "                if not chunk:",
        "                if False:",
        ("tests/test_tlslayer.py",),
    ),
    Mutant(
        "tls-quit-without-close-notify",
        "the server ends TLS with close_notify",
        TLSLAYER,
        "            self._tls.unwrap()",
        "            pass",
        ("tests/test_tlslayer.py",),
    ),
    Mutant(
        "tls-old-versions-unusable",
        "TLS 1.0/1.1 work when minProtocol asks for them",
        SERVERTLS,
        '        context.set_ciphers("DEFAULT:@SECLEVEL=0")',
        "        pass",
        ("tests/test_tlslayer.py",),
    ),
    Mutant(
        "tls-session-cycle-kept",
        "a TLS session lets go of its protocol when the connection goes",
        TLSLAYER,
        "        self._deliver = self._onHandshake = self._flush = _nothing",
        "        pass",
        ("tests/test_tlslayer.py",),
    ),
    Mutant(
        "tls-greeting-before-handshake",
        "over implicit TLS nothing is written before the handshake is done",
        TLSLAYER,
        "        if self._handshaking:\n            self._held.append(data)\n            return",
        "        if False:\n            self._held.append(data)\n            return",
        ("tests/test_tls.py", "tests/test_tlslayer.py"),
    ),
    Mutant(
        "tls-no-resumption",
        "clients offering their last session resume it",
        SERVERTLS,
        "    context.num_tickets = 1",
        "    context.num_tickets = 0",
        ("tests/test_tls.py",),
    ),
    Mutant(
        "tls-resumed-not-logged",
        "the session log says when a client resumed its TLS session",
        PROTOCOL,
        '            self._events.tlsStarted(self, version, bool(getattr(self.transport, "tlsResumed", False)))',
        "            self._events.tlsStarted(self, version, False)",
        ("tests/test_server_postfix.py",),
    ),
    Mutant(
        "data-long-line-skipped",
        "every line of a long DATA chunk is held to maxDataLineLength",
        WIRE,
        "            start = last + 1",
        "            start = last + limit",
        ("tests/test_wire.py",),
    ),
    Mutant(
        "data-first-line-partial-forgotten",
        "a line read in pieces is measured whole",
        WIRE,
        "        if self._partialLength + first + 1 > limit:",
        "        if first + 1 > limit:",
        ("tests/test_wire.py",),
    ),
    Mutant(
        "tls-stateful-session-cache",
        "resumption is by ticket: the server keeps no session per client",
        SERVERTLS,
        "    context.options |= ssl.OP_NO_RENEGOTIATION",
        "    context.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_TICKET",
        ("tests/test_tlslayer.py",),
    ),
    Mutant(
        "data-stuffed-dot-kept",
        "a dot-stuffed line is unstuffed wherever it is in a read",
        WIRE,
        "            self._emit(bytes(memoryview(buf)[: last + 2]), True, 0 <= dot < last)",
        "            self._emit(bytes(memoryview(buf)[: last + 2]), True, False)",
        ("tests/test_wire.py",),
    ),
    Mutant(
        "data-first-stuffed-dot-missed",
        "the scan for CRLF-dot reports the first dot-stuffed line",
        WIRE,
        "        if dot < 0:\n            dot = found",
        "        if dot < 0:\n            pass",
        ("tests/test_wire.py",),
    ),
    Mutant(
        "data-end-across-reads-missed",
        "the end of data is found however the reads cut it",
        WIRE,
        "            end, dot = _scanDots(buf, max(self._searched - 4, 0))",
        "            end, dot = _scanDots(buf, self._searched)",
        ("tests/test_wire.py",),
    ),
]


def isOneLine(m: Mutant) -> bool:
    """
    Whether the mutant changes (or removes) exactly one line.
    """
    diff = list(difflib.ndiff(m.original.splitlines(), m.mutated.splitlines()))
    removed = sum(line.startswith("- ") for line in diff)
    added = sum(line.startswith("+ ") for line in diff)
    return removed == 1 and added <= 1


def layOut(scratch: str, worktree: bool) -> None:
    """
    The repository's files (committed, or as they are now) in C{scratch}.
    """
    if worktree:
        ignore = shutil.ignore_patterns(".git", ".venv", "__pycache__", "*.egg-info", ".hypothesis", "build", "dist")
        shutil.copytree(REPO, scratch, ignore=ignore, dirs_exist_ok=True)
        return
    archive = subprocess.run(["git", "-C", REPO, "archive", "HEAD"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", scratch], input=archive, check=True)


def environment(scratch: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = scratch + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def checkImports(scratch: str, python: str) -> None:
    """
    Make sure the tests there import the scratch copy, not the installed
    (editable) one: a mutation run that tests the wrong package would
    report every mutant caught or none.
    """
    where = subprocess.run(
        [python, "-c", "import infsmtp, os; print(os.path.dirname(infsmtp.__file__))"],
        cwd=scratch, env=environment(scratch), check=True, capture_output=True, text=True,
    ).stdout.strip()
    if os.path.realpath(where) != os.path.realpath(os.path.join(scratch, "infsmtp")):
        sys.exit(f"the scratch copy imports infsmtp from {where}, not its own: cannot mutate")


def runTests(scratch: str, python: str, tests: tuple[str, ...], deadline: float) -> tuple[str, float, str]:
    """
    Run C{tests} in C{scratch}: C{("passed" | "failed" | "timeout", seconds, tail of the output)}.
    """
    started = time.monotonic()
    command = [python, "-m", "pytest", "-x", "-q", "-p", "no:randomly", "-o", "addopts=-p no:cacheprovider", *tests]
    try:
        done = subprocess.run(
            command, cwd=scratch, env=environment(scratch), capture_output=True, text=True, timeout=deadline,
            start_new_session=True,
        )
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        return "timeout", time.monotonic() - started, out[-600:]
    outcome = "passed" if done.returncode == 0 else "failed"
    tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-3:])
    return outcome, time.monotonic() - started, tail


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="comma-separated mutant names")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--worktree", action="store_true", help="mutate the working tree, not HEAD")
    parser.add_argument("--python", default=os.path.join(REPO, ".venv", "bin", "python"))
    parser.add_argument("--deadline", type=float, default=900, help="seconds for one mutant's tests")
    parser.add_argument("--no-baseline", action="store_true", help="skip checking the unmutated tests pass")
    parser.add_argument("--verbose", action="store_true", help="show how each caught mutant failed")
    parser.add_argument("--tests", help="comma-separated test files to run instead of each mutant's own")
    options = parser.parse_args(argv)

    mutants = MUTANTS
    if options.only:
        wanted = set(options.only.split(","))
        unknown = wanted - {m.name for m in MUTANTS}
        if unknown:
            parser.error(f"unknown mutants: {', '.join(sorted(unknown))}")
        mutants = [m for m in MUTANTS if m.name in wanted]
    if options.tests:
        # Does this test file alone hold the promise?
        mutants = [dataclasses.replace(m, tests=tuple(options.tests.split(","))) for m in mutants]
    if options.list:
        for m in mutants:
            print(f"{m.name:34} {m.path:28} {m.promise}")
        return 0

    caught, survived, stale = [], [], []
    with tempfile.TemporaryDirectory(prefix="infsmtp-mutate-") as scratch:
        layOut(scratch, options.worktree)
        checkImports(scratch, options.python)
        if not options.no_baseline:
            # Every test file involved must pass unmutated, or a "caught"
            # would mean nothing.
            files = tuple(sorted({t for m in mutants for t in m.tests}))
            outcome, seconds, tail = runTests(scratch, options.python, files, options.deadline * 2)
            print(f"baseline: {outcome} in {seconds:.0f} s ({len(files)} test files)", flush=True)
            if outcome != "passed":
                print(tail)
                return 2
        for m in mutants:
            path = os.path.join(scratch, m.path)
            with open(path, encoding="utf-8") as f:
                source = f.read()
            if source.count(m.original) != 1:
                stale.append(m)
                print(f"STALE     {m.name}: its original text is in {m.path} {source.count(m.original)} times", flush=True)
                continue
            assert isOneLine(m), f"{m.name} changes more than one line"
            with open(path, "w", encoding="utf-8") as f:
                f.write(source.replace(m.original, m.mutated))
            try:
                outcome, seconds, tail = runTests(scratch, options.python, m.tests, options.deadline)
            finally:
                with open(path, "w", encoding="utf-8") as f:
                    f.write(source)
            if outcome == "passed":
                survived.append(m)
                print(f"SURVIVED  {m.name} ({seconds:.0f} s): {m.promise}", flush=True)
            else:
                caught.append(m)
                print(f"caught    {m.name} ({outcome}, {seconds:.0f} s)", flush=True)
                if options.verbose:
                    print("          " + tail.replace("\n", "\n          "), flush=True)
    total = len(caught) + len(survived)
    print(f"\n{len(caught)}/{total} mutants caught" + (f", {len(stale)} stale" if stale else ""))
    for m in survived:
        print(f"  survived: {m.name} ({m.path}): {m.promise}")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
