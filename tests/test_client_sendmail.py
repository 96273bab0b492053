"""
Issue 11, item 4, against aiosmtpd: smtplib's ``sendmail(sender,
recipients, message, mailOptions, rcptOptions)`` on ``AsyncClient`` and
``Client``, the options on the wire, and the options that would inject
refused before anything is sent.
"""

from __future__ import annotations

import io

import pytest
import pytest_twisted
from aiosmtpd.smtp import SMTP
from peertools import EphemeralController
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread

from infsmtp import AsyncClient, Client, SMTPError

MESSAGE = b"From: ann@example.org\r\nTo: bob@example.org\r\nSubject: raw\r\n\r\nHello.\r\n"

#: Seconds: the bound on each wait below.
WAIT = 10

#: The DSN parameters this aiosmtpd takes (stock aiosmtpd answers 555).
DSN = {"RET", "ENVID", "NOTIFY", "ORCPT"}


class DSNSMTP(SMTP):
    def _getparams(self, params):
        parsed = super()._getparams(params)
        return None if parsed is None else {k: v for k, v in parsed.items() if k not in DSN}


class Recorder:
    def __init__(self) -> None:
        self.mails: list[tuple[str, list[str]]] = []
        self.rcpts: list[tuple[str, list[str]]] = []
        self.envelopes: list[tuple[str, list[str], bytes]] = []

    async def handle_MAIL(self, server, session, envelope, address, options):
        self.mails.append((address, options))
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 OK"

    async def handle_RCPT(self, server, session, envelope, address, options):
        self.rcpts.append((address, options))
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        self.envelopes.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content))
        return "250 2.0.0 OK"


class DSNController(EphemeralController):
    def factory(self):
        return DSNSMTP(self.handler, **self.SMTP_kwargs)


@pytest.fixture
def aiosmtpd():
    handler = Recorder()
    controller = DSNController(handler, hostname="127.0.0.1", port=0)
    controller.start()
    handler.port = controller.port
    yield handler
    controller.stop()


def bounded(d: Deferred) -> Deferred:
    return d.addTimeout(WAIT, reactor)


def connected(server: Recorder) -> AsyncClient:
    # Connected by "async with".
    return AsyncClient(host="127.0.0.1", port=server.port, timeout=WAIT * 1000)


@pytest.mark.parametrize("kind", ["bytes", "str", "file"])
@pytest_twisted.ensureDeferred
async def test_sendmailTakesTheEnvelopeAsGiven(aiosmtpd, kind):
    message = {"bytes": MESSAGE, "str": MESSAGE.decode("ascii"), "file": io.BytesIO(MESSAGE)}[kind]
    async with connected(aiosmtpd) as client:
        refused = await bounded(client.sendmail("zed@example.org", ["cat@example.net", "dog@example.net"], message))
    assert refused == {}
    assert aiosmtpd.envelopes == [("zed@example.org", ["cat@example.net", "dog@example.net"], MESSAGE)]
    # No options asked: only the client's own.
    [(_, mailOptions)] = aiosmtpd.mails
    assert mailOptions == [f"SIZE={len(MESSAGE)}"]
    assert [options for _, options in aiosmtpd.rcpts] == [[], []]


@pytest_twisted.ensureDeferred
async def test_nullSenderAndOneRecipientAsAString(aiosmtpd):
    async with connected(aiosmtpd) as client:
        await bounded(client.sendmail("", "cat@example.net", MESSAGE))
    assert aiosmtpd.envelopes == [("<>", ["cat@example.net"], MESSAGE)]


@pytest_twisted.ensureDeferred
async def test_optionsOnTheWire(aiosmtpd):
    async with connected(aiosmtpd) as client:
        await bounded(
            client.sendmail(
                "zed@example.org",
                ["cat@example.net", "dog@example.net"],
                MESSAGE,
                mailOptions=["RET=HDRS", "ENVID=QQ314159"],
                rcptOptions=("NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;cat@example.net"),
            )
        )
    # aiosmtpd upper-cases what it records.
    [(_, mailOptions)] = aiosmtpd.mails
    assert mailOptions == [f"SIZE={len(MESSAGE)}", "RET=HDRS", "ENVID=QQ314159"]
    expected = ["NOTIFY=SUCCESS,FAILURE", "ORCPT=RFC822;CAT@EXAMPLE.NET"]
    assert aiosmtpd.rcpts == [("cat@example.net", expected), ("dog@example.net", expected)]
    assert len(aiosmtpd.envelopes) == 1


@pytest_twisted.ensureDeferred
async def test_givenOptionReplacesTheClientsOwn(aiosmtpd):
    eightBit = MESSAGE.replace(b"Hello.", "Grüße.".encode())
    async with connected(aiosmtpd) as client:
        await bounded(client.sendmail("zed@example.org", ["cat@example.net"], eightBit, ["body=8bitmime"]))
        await bounded(client.sendmail("zed@example.org", ["cat@example.net"], eightBit))
    [(_, given), (_, own)] = aiosmtpd.mails
    assert given == [f"SIZE={len(eightBit)}", "BODY=8BITMIME"]
    assert own == [f"SIZE={len(eightBit)}", "BODY=8BITMIME"]


@pytest.mark.parametrize(
    "option",
    [
        "NOTIFY=SUCCESS FAILURE",
        "NOTIFY=NEVER\r\nRSET",
        "NOTIFY=NEVER\nRSET",
        "ORCPT=rfc822;<x@example.org>",
        "ORCPT=rfc822;x@example.org>",
        "A=B=C",
        "",
        "=VALUE",
        "-X=1",
        "NOTIFY=",
        "ENVID=ü",
        "NOTIFY\x00=NEVER",
        b"NOTIFY=NEVER",
    ],
)
@pytest.mark.parametrize("where", ["mailOptions", "rcptOptions"])
@pytest_twisted.ensureDeferred
async def test_injectingOptionsAreRefusedBeforeSending(aiosmtpd, option, where):
    async with connected(aiosmtpd) as client:
        with pytest.raises(SMTPError, match="KEYWORD=VALUE"):
            await bounded(client.sendmail("zed@example.org", ["cat@example.net"], MESSAGE, **{where: [option]}))
        # Nothing went out, and the session goes on.
        assert aiosmtpd.mails == []
        await bounded(client.sendmail("zed@example.org", ["cat@example.net"], MESSAGE, **{where: [{"mailOptions": "RET=FULL", "rcptOptions": "NOTIFY=NEVER"}[where]]}))
    assert len(aiosmtpd.mails) == 1


@pytest_twisted.ensureDeferred
async def test_blockingClientSendmail(aiosmtpd):
    def run():
        with Client(host="127.0.0.1", port=aiosmtpd.port, timeout=WAIT * 1000) as client:
            client.connect()
            refused = client.sendmail("zed@example.org", ["cat@example.net"], MESSAGE, ["RET=FULL"], ["NOTIFY=NEVER"])
            client.disconnect()
            return refused

    # Off the reactor thread, where a blocking call belongs.
    refused = await bounded(deferToThread(run))
    assert refused == {}
    assert aiosmtpd.mails == [("zed@example.org", [f"SIZE={len(MESSAGE)}", "RET=FULL"])]
    assert aiosmtpd.rcpts == [("cat@example.net", ["NOTIFY=NEVER"])]
    assert aiosmtpd.envelopes == [("zed@example.org", ["cat@example.net"], MESSAGE)]
