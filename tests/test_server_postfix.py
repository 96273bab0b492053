"""
Issue 14, items 1-3, over real sockets: infsmtp's server fed by peers we
did not write where they exist.

- Postfix relaying into infsmtp (its smtp client): DSN's parameters reach
  the handlers (Postfix passes them on to a next hop that offers DSN).
- Postfix delivering into infsmtp with its lmtp client: one reply per
  recipient, each recipient's fate in Postfix's own log.
- BDAT: Postfix's smtp client never sends BDAT (it has no CHUNKING support
  in 3.7, whatever the server offers), nor do smtplib, swaks or curl; the
  client of this package does (shown against Postfix's smtpd in
  test_client_postfix.py), so it is the peer here, with the server's
  transcript as the witness of what went on the wire.
"""

from __future__ import annotations

import re
import smtplib

import pytest_twisted
from mailservers import PostfixServer, waitUntil
from twisted.internet import reactor
from twisted.internet.threads import deferToThread

from infsmtp import AsyncClient, Server, SMTPError

WAIT = 30


async def startServer(**options) -> tuple[Server, list]:
    received: list = []
    server = Server(port=0, interface="127.0.0.1", hostname="infsmtp.test", receivedHeader=False, **options)

    def onReceive(session):
        received.append(
            (session.mailFrom, list(session.rcptTo), dict(session.mailParameters),
             {a: dict(p) for a, p in session.rcptParameters.items()}, session.msg)
        )
        for address, result in session.data.get("results", {}).items():
            session.rcptResults[address] = result

    server.onReceive = onReceive
    await server.startListening().addTimeout(WAIT, reactor)
    return server, received


def relayingPostfix(port: int, **settings: str) -> PostfixServer:
    """
    A Postfix that delivers everything at once to 127.0.0.1:port (nothing
    held, nothing deferred on purpose).
    """
    return PostfixServer(
        **{
            "smtpd_end_of_data_restrictions": "",
            "defer_transports": "",
            "smtp_tls_security_level": "none",
            "smtp_dns_support_level": "disabled",
            **settings,
        }
    )


def postfixStatus(postfix: PostfixServer, recipient: str) -> str:
    """
    Postfix's last word on delivering to ``recipient``: ``sent``,
    ``deferred`` or ``bounced``, with the reply (waiting for it, bounded).
    """
    pattern = re.compile(rf"to=<{re.escape(recipient)}>.*status=(\w+) \((.*)\)")
    found: list[str] = []

    def seen() -> bool:
        text = postfix.log.read_text(errors="replace") if postfix.log.exists() else ""
        matches = pattern.findall(text)
        if matches:
            found[:] = [f"{matches[-1][0]}: {matches[-1][1]}"]
        return bool(matches)

    waitUntil(seen, f"Postfix's delivery to {recipient}", postfix.log, WAIT)
    return found[0]


def submit(port: int, sender: str, recipients: list[str], message: bytes, mailOptions=(), rcptOptions=()) -> dict:
    with smtplib.SMTP("127.0.0.1", port, timeout=WAIT) as client:
        return client.sendmail(sender, recipients, message, list(mailOptions), list(rcptOptions))


MESSAGE = b"From: ann@example.org\r\nSubject: through Postfix\r\n\r\n.dot\r\nHello.\r\n"


@pytest_twisted.ensureDeferred
async def test_postfixPassesDsnParametersOnToTheHandlers():
    server, received = await startServer()
    postfix = relayingPostfix(server.port, relayhost=f"[127.0.0.1]:{server.port}")
    try:
        await deferToThread(
            submit, postfix.port, "ann@example.org", ["bob@example.net"], MESSAGE,
            ["RET=HDRS", "ENVID=env42"], ["NOTIFY=SUCCESS,DELAY", "ORCPT=rfc822;bob@example.net"],
        )
        status = await deferToThread(postfixStatus, postfix, "bob@example.net")
        assert status.startswith("sent: 250 2.0.0 OK queued as"), status
        [(sender, recipients, mailParameters, rcptParameters, msg)] = received
        assert (sender, recipients) == ("ann@example.org", ["bob@example.net"])
        assert mailParameters["RET"] == "HDRS" and mailParameters["ENVID"] == "env42"
        assert rcptParameters["bob@example.net"]["NOTIFY"] == "SUCCESS,DELAY"
        assert rcptParameters["bob@example.net"]["ORCPT"] == "rfc822;bob@example.net"
        assert msg.endswith(b"\r\n\r\n.dot\r\nHello.\r\n")
    finally:
        postfix.stop()
        await server.stopListening().addTimeout(WAIT, reactor)


@pytest_twisted.ensureDeferred
async def test_postfixLmtpClientHearsEachRecipient():
    server, received = await startServer(lmtp=True)
    results = {"bob@example.net": SMTPError(452, "4.2.2 Mailbox full"), "carl@example.net": False}
    server.onConnect = lambda session: session.data.update(results=results) or None
    postfix = relayingPostfix(server.port, default_transport=f"lmtp:inet:127.0.0.1:{server.port}")
    try:
        await deferToThread(
            submit, postfix.port, "ann@example.org",
            ["alice@example.net", "bob@example.net", "carl@example.net"], MESSAGE,
        )
        alice = await deferToThread(postfixStatus, postfix, "alice@example.net")
        bob = await deferToThread(postfixStatus, postfix, "bob@example.net")
        carl = await deferToThread(postfixStatus, postfix, "carl@example.net")
        assert alice.startswith("sent: 250 2.0.0 <alice@example.net> OK queued as"), alice
        assert bob.startswith("deferred: host 127.0.0.1[127.0.0.1] said: 452 4.2.2 <bob@example.net> Mailbox full"), bob
        assert carl.startswith("bounced: host 127.0.0.1[127.0.0.1] said: 550 5.7.1 <carl@example.net>"), carl
        assert received[0][1] == ["alice@example.net", "bob@example.net", "carl@example.net"]
    finally:
        postfix.stop()
        await server.stopListening().addTimeout(WAIT, reactor)


@pytest_twisted.ensureDeferred
async def test_ourClientSendsBdatToOurServer(logEvents):
    server, received = await startServer(debug=True)
    try:
        content = b"Subject: chunks\r\n\r\n" + b"".join(b".%05d\r\n" % i for i in range(30000))
        async with AsyncClient(host="127.0.0.1", port=server.port) as client:
            assert client.supportsExtension("CHUNKING")
            await client.sendmail("ann@example.org", ["bob@example.net"], b"Subject: one\r\n\r\n.x\r\n")
            await client.sendmail("ann@example.org", ["bob@example.net"], content)
        assert [m[4] for m in received] == [b"Subject: one\r\n\r\n.x\r\n", content]
        lines = [e["line"] for e in logEvents if e.get("event") == "transcript" and e.get("direction") == "<"]
        chunks = [line for line in lines if line.startswith("BDAT")]
        # One BDAT for the small message; several for the long one (it
        # streams), the last one LAST.  No DATA at all.
        assert chunks[0].endswith(" LAST") and len(chunks) >= 4 and chunks[-1].endswith(" LAST"), chunks
        assert not any(line.startswith("DATA") for line in lines)
    finally:
        await server.stopListening().addTimeout(WAIT, reactor)


@pytest_twisted.ensureDeferred
async def test_postfixResumesItsTlsSession(certificateAuthority, logEvents):
    """
    Issue 15: Postfix's smtp client, with its TLS session cache, resumes
    on its next connection the session it had with us (a ticket), and the
    session log says so.
    """
    server = Server(
        port=0, interface="127.0.0.1", hostname="localhost", receivedHeader=False, ssl=True, sessionLog=True
    )
    server.setCertificate(certificateAuthority.localhost.certFile, certificateAuthority.localhost.keyFile)
    received = []
    server.onReceive = lambda session: received.append(session.tlsVersion)
    await server.startListening().addTimeout(WAIT, reactor)
    postfix = relayingPostfix(
        server.port,
        relayhost=f"[127.0.0.1]:{server.port}",
        smtp_tls_security_level="encrypt",
        smtp_tls_session_cache_database="btree:${data_directory}/smtp_scache",
        # A connection per message: the second one must resume, not reuse.
        smtp_connection_cache_on_demand="no",
    )
    try:
        for n in (1, 2, 3):
            recipient = f"bob{n}@example.net"
            await deferToThread(submit, postfix.port, "ann@example.org", [recipient], MESSAGE)
            status = await deferToThread(postfixStatus, postfix, recipient)
            assert status.startswith("sent: 250 2.0.0 OK queued as"), status
        tls = [e for e in logEvents if e.get("event") == "tls" and e.get("log_namespace") == "infsmtp.session"]
        assert [e["resumed"] for e in tls] == [False, True, True], tls
        assert received == ["TLSv1.3"] * 3
    finally:
        postfix.stop()
        await server.stopListening().addTimeout(WAIT, reactor)
