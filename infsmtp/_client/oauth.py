"""
OAuth 2.0 bearer tokens for the client's ``XOAUTH2`` and ``OAUTHBEARER``
(RFC 7628): where a token comes from, and what a token may hold.

A token comes from the user's ``tokenProvider`` (called, awaited if need
be, and checked) or, without one, is the ``password``.  Tokens expire: the
protocol asks for a fresh one once when the server refuses one
(:meth:`BearerTokens.token` with ``refresh=True``).  This room knows nothing
of the wire; :meth:`infsmtp._client.protocol.ESMTPSessionClient.authenticate`
runs the exchange.

A token is a secret: no error raised here quotes it, nor anything a
provider returned.
"""

from __future__ import annotations

import inspect
import re
from typing import Any, Callable, Sequence

from twisted.internet.defer import CancelledError, Deferred

from .._errors import SMTPAuthenticationError

#: The SASL mechanisms that send a bearer token.
BEARER_MECHANISMS = frozenset({"XOAUTH2", "OAUTHBEARER"})

#: RFC 6750 2.1's b64token: what "auth=Bearer " may be followed by.  A
#: space, a ^A or a line ending would add a field of its own.
_B64TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*", re.ASCII)

#: The longest description of a provider's exception put in an error.
_MAX_REASON = 200


class BearerTokens:
    """
    The bearer tokens of one :meth:`authenticate` call.

    :param username: the user the tokens are for.
    :param password: the token when there is no ``provider``.
    :param provider: ``provider(username, refresh)`` returning a ``str``, a
        Deferred of one or a coroutine (run as ``Deferred.fromCoroutine``
        runs it); ``refresh`` is ``True`` when the server refused the
        previous token, so that a cached one is not given again.
    :param host: the host name ``OAUTHBEARER`` sends (``host=``).
    :param mechanisms: the mechanisms that may be tried: with a ``provider``
        one of them must take a token, or the provider would silently go
        unused.
    :raises SMTPAuthenticationError: when ``provider`` is not callable or
        ``mechanisms`` holds no bearer mechanism.
    """

    def __init__(
        self,
        username: str,
        password: str,
        provider: Callable[[str, bool], Any] | None = None,
        host: str | None = None,
        mechanisms: Sequence[str] = tuple(BEARER_MECHANISMS),
    ) -> None:
        if provider is not None:
            if not callable(provider):
                raise SMTPAuthenticationError(
                    f"tokenProvider must be a callable tokenProvider(username, refresh), "
                    f"not {type(provider).__name__}"
                )
            if not BEARER_MECHANISMS.intersection(m.upper() for m in mechanisms):
                raise SMTPAuthenticationError(
                    "tokenProvider is used by XOAUTH2 and OAUTHBEARER only: set "
                    "authMode = AuthMode.sasl with one of them in saslMechanisms"
                )
        self.username = username
        self.host = host
        self._password = password
        self._provider = provider

    @property
    def refreshable(self) -> bool:
        """
        Whether asking again may give another token.
        """
        return self._provider is not None

    async def token(self, refresh: bool = False) -> str:
        """
        The token to send: the provider's, checked, else the password.

        :raises SMTPAuthenticationError: when the provider raises or fails,
            or what it gives is not a non-empty ``str`` of RFC 6750's token
            characters (the value is never quoted).
        """
        provider = self._provider
        if provider is None:
            return self._password
        try:
            result = provider(self.username, refresh)
            if isinstance(result, Deferred) or inspect.isawaitable(result):
                result = await result
        except CancelledError:
            raise
        except Exception as e:
            raise SMTPAuthenticationError(f"the tokenProvider failed: {_describe(e)}") from e
        if not isinstance(result, str):
            raise SMTPAuthenticationError(
                f"the tokenProvider returned {type(result).__name__}, not a str token"
            )
        if not result:
            raise SMTPAuthenticationError("the tokenProvider returned an empty token")
        if _B64TOKEN.fullmatch(result) is None:
            raise SMTPAuthenticationError(
                "the tokenProvider returned a token with a character a bearer token cannot "
                "hold (RFC 6750: letters, digits, -._~+/ and = at the end)"
            )
        return result


def _describe(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
    text = text.encode("unicode_escape").decode("ascii")
    return text if len(text) <= _MAX_REASON else text[:_MAX_REASON] + "..."


def saslName(name: str) -> str:
    """
    ``name`` as a GS2 header's authorization identity (RFC 5801): ``=``
    and ``,`` escaped as ``=3D`` and ``=2C``.

    >>> saslName("a,b=c")
    'a=2Cb=3Dc'
    """
    return name.replace("=", "=3D").replace(",", "=2C")
