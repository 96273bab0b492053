"""
Delivery Status Notification parameters (RFC 3461), sans I/O: ``RET`` and
``ENVID`` on MAIL, ``NOTIFY`` and ``ORCPT`` on RCPT, checked and decoded
from their xtext so that handlers see plain values.

    >>> parseMailDSN({"RET": "hdrs", "ENVID": "QQ+2B314159"})
    {'RET': 'HDRS', 'ENVID': 'QQ+314159'}
    >>> parseRcptDSN({"NOTIFY": "success,Failure", "ORCPT": "rfc822;bob+2Bx@example.org"})
    {'NOTIFY': ('SUCCESS', 'FAILURE'), 'ORCPT': ('rfc822', 'bob+x@example.org')}
"""

from __future__ import annotations

import re
from typing import Mapping

#: RFC 3461 4.4: ENVID is at most 100 characters (as sent, xtext).
MAX_ENVID = 100

#: RFC 3461 4.2: ORCPT's whole value is at most 500 characters.
MAX_ORCPT = 500

NOTIFY_EVENTS = ("SUCCESS", "FAILURE", "DELAY")

_XTEXT = re.compile(r"(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})*")
_HEXCHAR = re.compile(r"\+([0-9A-F]{2})")
# RFC 6533 3: utf-8-addr-xtext escapes as \x{HEX}, 1 to 6 digits.
_UTF8_ESCAPE = re.compile(r"\\x\{([0-9A-F]{1,6})\}")
_ADDRESS_TYPE = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+")


class DSNError(ValueError):
    """
    A DSN parameter that does not parse; the text is the reason, for a
    ``501 5.5.4`` reply.
    """


def _unescape(match: re.Match[str]) -> str:
    value = int(match.group(1), 16)
    if value > 0x10FFFF:
        raise DSNError("ORCPT holds an escape past the last Unicode character")
    return chr(value)


def decodeXtext(value: str, what: str) -> str:
    """
    Decode RFC 3461's xtext (``+2B`` for ``+``).

    :raises DSNError: when ``value`` is not xtext, or encodes a character
        outside printable ASCII.
    """
    if _XTEXT.fullmatch(value) is None:
        raise DSNError(f"{what} is not xtext (printable ASCII, '+XX' for '+', '=' and others)")
    decoded = _HEXCHAR.sub(lambda m: chr(int(m.group(1), 16)), value)
    if not all(" " <= c <= "~" for c in decoded):
        raise DSNError(f"{what} encodes a control character")
    return decoded


def encodeXtext(text: str) -> str:
    """
    Encode printable ASCII as xtext: the inverse of :func:`decodeXtext`.

    >>> encodeXtext("a+b=c d")
    'a+2Bb+3Dc+20d'
    """
    return "".join(c if "!" <= c <= "~" and c not in "+=" else "+%02X" % ord(c) for c in text)


def parseMailDSN(params: Mapping[str, str | None]) -> dict[str, str]:
    """
    The DSN parameters among MAIL's (keywords in upper case): ``RET``
    (``FULL`` or ``HDRS``) and ``ENVID`` (decoded).  Others are left to
    their own checks.

    :raises DSNError: when one does not parse.
    """
    found: dict[str, str] = {}
    if "RET" in params:
        ret = (params["RET"] or "").upper()
        if ret not in ("FULL", "HDRS"):
            raise DSNError("RET must be FULL or HDRS")
        found["RET"] = ret
    if "ENVID" in params:
        envid = params["ENVID"] or ""
        if not envid:
            raise DSNError("ENVID is empty")
        if len(envid) > MAX_ENVID:
            raise DSNError(f"ENVID is over {MAX_ENVID} characters")
        found["ENVID"] = decodeXtext(envid, "ENVID")
    return found


def parseRcptDSN(params: Mapping[str, str | None]) -> dict[str, object]:
    """
    The DSN parameters among RCPT's: ``NOTIFY`` (a tuple: ``("NEVER",)``,
    or some of ``SUCCESS``, ``FAILURE``, ``DELAY``) and ``ORCPT`` (a tuple
    ``(address type, address)``, decoded).

    :raises DSNError: when one does not parse.
    """
    found: dict[str, object] = {}
    if "NOTIFY" in params:
        words = [w.upper() for w in (params["NOTIFY"] or "").split(",")]
        if words == ["NEVER"]:
            found["NOTIFY"] = ("NEVER",)
        elif not words or any(w not in NOTIFY_EVENTS for w in words) or len(set(words)) != len(words):
            raise DSNError("NOTIFY must be NEVER, or SUCCESS, FAILURE and DELAY separated by commas")
        else:
            found["NOTIFY"] = tuple(words)
    if "ORCPT" in params:
        orcpt = params["ORCPT"] or ""
        if len(orcpt) > MAX_ORCPT:
            raise DSNError(f"ORCPT is over {MAX_ORCPT} characters")
        addressType, semicolon, address = orcpt.partition(";")
        if not semicolon or _ADDRESS_TYPE.fullmatch(addressType) is None or not address:
            raise DSNError("ORCPT must be address-type;address (rfc822;bob@example.org)")
        if addressType.lower() == "utf-8":
            # RFC 6533: UTF-8 as it is, with \x{HEX} for what xtext escapes.
            decoded = _UTF8_ESCAPE.sub(_unescape, address)
            if any(c < " " or c == "\x7f" or "\ud800" <= c <= "\udfff" for c in decoded):
                raise DSNError("ORCPT encodes a control character or a lone surrogate")
        else:
            decoded = decodeXtext(address, "ORCPT")
        found["ORCPT"] = (addressType, decoded)
    return found
