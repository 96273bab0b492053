"""
Handlers for ``twistd infsmtp --handlers bench/sinks/accept.py``: accept
and discard every message (for the --workers comparison).
"""


def onReceive(session):
    return True
