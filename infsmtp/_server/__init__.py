"""
The server: L{Server} and its factory, the session protocol and its rooms
(output, handler decisions, the mail transaction, SASL, policy hooks), the
session handlers see, handler adaptation, TLS contexts, per-client limits,
the PROXY reader and the metrics.  Stands on the shared floor (C{infsmtp._wire},
C{_errors}, ...); never imports the client or the daemon.
"""
