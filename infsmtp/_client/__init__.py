"""
The client: L{AsyncClient} and L{Client}, the session protocol, client TLS,
OAuth2 tokens, envelope derivation, the connection pool and the debug
transcript.  Stands on the shared floor; never imports the server or the
daemon.
"""
