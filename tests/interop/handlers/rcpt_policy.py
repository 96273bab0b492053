# A handler script (infsmtp runs it in its thread pool with `session` in its
# globals): accept recipients at allowed.test, refuse nobody@ with a chosen
# reply, fail for crash@ (a bug: the server must answer 4xx), and record the
# thread it ran in.
import threading

from infsmtp import SMTPError

session.data.setdefault("threads", []).append(threading.current_thread().name)
if session.address.startswith("nobody@"):
    raise SMTPError(550, "5.1.1 No such user")
if session.address.startswith("crash@"):
    raise RuntimeError("bug in rcpt_policy.py")
session.accept = session.address.endswith("@allowed.test")
