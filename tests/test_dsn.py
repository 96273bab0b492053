"""
DSN parameters (RFC 3461), sans I/O: what the server accepts on MAIL and
RCPT and hands its handlers, and what it refuses with 501.
"""

from __future__ import annotations

import doctest

import pytest
from hypothesis import given
from hypothesis import strategies as st

from infsmtp import _dsn
from infsmtp._dsn import DSNError, decodeXtext, encodeXtext, parseMailDSN, parseRcptDSN


def test_doctests():
    assert doctest.testmod(_dsn).failed == 0


@given(st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E)))
def test_xtextRoundTrips(text):
    encoded = encodeXtext(text)
    assert all("!" <= c <= "~" and c != "=" for c in encoded)
    assert decodeXtext(encoded, "x") == text


@given(st.text())
def test_decodingAnyTextEitherWorksOrSaysWhy(text):
    try:
        decoded = decodeXtext(text, "ENVID")
    except DSNError as e:
        assert "ENVID" in str(e)
    else:
        assert all(" " <= c <= "~" for c in decoded)


@pytest.mark.parametrize(
    "params, expected",
    [
        ({}, {}),
        ({"RET": "full"}, {"RET": "FULL"}),
        ({"RET": "HDRS", "ENVID": "a+2Bb"}, {"RET": "HDRS", "ENVID": "a+b"}),
        ({"SIZE": "10"}, {}),
    ],
)
def test_mailParameters(params, expected):
    assert parseMailDSN(params) == expected


@pytest.mark.parametrize(
    "params, why",
    [
        ({"RET": "ALL"}, "RET must be FULL or HDRS"),
        ({"RET": None}, "RET must be FULL or HDRS"),
        ({"ENVID": None}, "ENVID is empty"),
        ({"ENVID": "x" * 101}, "over 100"),
        ({"ENVID": "a+2"}, "not xtext"),
        ({"ENVID": "a+0A"}, "control character"),
    ],
)
def test_badMailParameters(params, why):
    with pytest.raises(DSNError, match=why):
        parseMailDSN(params)


@pytest.mark.parametrize(
    "params, expected",
    [
        ({"NOTIFY": "never"}, {"NOTIFY": ("NEVER",)}),
        ({"NOTIFY": "DELAY,success"}, {"NOTIFY": ("DELAY", "SUCCESS")}),
        ({"ORCPT": "rfc822;a+2Bb@x.test"}, {"ORCPT": ("rfc822", "a+b@x.test")}),
        ({"ORCPT": "utf-8;j\\x{F6}rg@x.test"}, {"ORCPT": ("utf-8", "jörg@x.test")}),
    ],
)
def test_rcptParameters(params, expected):
    assert parseRcptDSN(params) == expected


@pytest.mark.parametrize(
    "params, why",
    [
        ({"NOTIFY": "NEVER,SUCCESS"}, "NOTIFY must be"),
        ({"NOTIFY": "SUCCESS,SUCCESS"}, "NOTIFY must be"),
        ({"NOTIFY": ""}, "NOTIFY must be"),
        ({"NOTIFY": None}, "NOTIFY must be"),
        ({"NOTIFY": "SOMETIMES"}, "NOTIFY must be"),
        ({"ORCPT": "bob@x.test"}, "address-type;address"),
        ({"ORCPT": "rfc822;"}, "address-type;address"),
        ({"ORCPT": "rfc 822;b@x"}, "address-type;address"),
        ({"ORCPT": "rfc822;" + "x" * 500}, "over 500"),
        ({"ORCPT": "utf-8;\\x{D800}"}, "surrogate"),
        ({"ORCPT": "utf-8;\\x{110000}"}, "past the last Unicode character"),
    ],
)
def test_badRcptParameters(params, why):
    with pytest.raises(DSNError, match=why):
        parseRcptDSN(params)
