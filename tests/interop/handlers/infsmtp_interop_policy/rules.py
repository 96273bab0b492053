"""
Handlers the interop tests name as 'infsmtp_interop_policy.rules:...'.
"""

from twisted.internet import defer, reactor, task

from infsmtp import SMTPError

calls = []


async def onMailFrom(session):
    # A coroutine that waits on a Deferred fired by the reactor later.
    await task.deferLater(reactor, 0, lambda: None)
    calls.append(("mail", session.address))
    return not session.address.startswith("spammer@")


def onRcptTo(session):
    calls.append(("rcpt", session.address))
    if session.address.startswith("full@"):
        raise SMTPError(452, "4.2.2 Mailbox full")
    return session.address.endswith("@example.net")


class Receiver:
    @staticmethod
    def onReceive(session):
        calls.append(("receive", session.message["Subject"]))
        return defer.succeed(session.message["Subject"] != "refuse me")
