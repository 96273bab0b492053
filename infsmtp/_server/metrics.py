"""
Prometheus metrics for a L{Server}, and the HTTP listener that serves them
with its health check (C{twistd infsmtp --metrics tcp:9125}).

The counts come from the session log's events (L{infsmtp._events}): the
server reports once, and L{ServerMetrics} is one more observer of the same
events, so a line in the log and a count here never disagree.  Each server
has a registry of its own (never C{prometheus_client}'s global one): two
servers in one process do not clash.

C{prometheus_client} is an optional dependency (C{pip install
infsmtp[metrics]}), imported here only: infsmtp works without it, and
asking for metrics without it is one clear error (L{MetricsUnavailable}).

What C{/healthz} answers: 200 C{ok} when the server is listening, not
shutting down, and its delivery target is writable (L{Server.health});
otherwise 503 with one problem per line.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.web import resource
from twisted.web.server import Site

log = Logger(namespace="infsmtp.metrics")

#: Upper bounds (seconds) of the handler latency histogram's buckets.
HANDLER_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class MetricsUnavailable(ImportError):
    """
    Metrics were asked for, and C{prometheus_client} is not installed.
    """


def _prometheus() -> Any:
    try:
        import prometheus_client
    except ImportError:
        raise MetricsUnavailable(
            "metrics need prometheus_client: pip install 'infsmtp[metrics]'"
        ) from None
    return prometheus_client


class ServerMetrics:
    """
    The counters and gauges of one server, fed by its session events.

    Every name starts with C{infsmtp_}; see docs/OPERATIONS.rst for the
    list and what each counts.

    @ivar registry: the server's own C{CollectorRegistry}.
    """

    def __init__(self, server: Any) -> None:
        prometheus = _prometheus()
        self.registry = registry = prometheus.CollectorRegistry()
        Counter, Gauge, Histogram = prometheus.Counter, prometheus.Gauge, prometheus.Histogram
        self.sessionsOpen = Gauge("infsmtp_sessions_open", "Sessions open now.", registry=registry)
        self.sessionsOpen.set_function(lambda: server.sessionCount)
        self.sessions = Counter("infsmtp_sessions", "Sessions begun (connections admitted).", registry=registry)
        self.accepted = Counter(
            "infsmtp_messages_accepted", "Messages accepted (250 at the end of DATA).", registry=registry
        )
        self.rejected = Counter(
            "infsmtp_messages_rejected",
            "5xx replies to MAIL, RCPT, DATA or the end of a message, by reason.",
            ["reason"],
            registry=registry,
        )
        self.tempfailed = Counter(
            "infsmtp_messages_tempfailed",
            "4xx replies to MAIL, RCPT, DATA or the end of a message, by reason.",
            ["reason"],
            registry=registry,
        )
        self.rejects = Counter(
            "infsmtp_rejects",
            "Every 4xx/5xx reply (connection limits, timeouts, syntax included), by command, code and reason.",
            ["command", "code", "reason"],
            registry=registry,
        )
        self.receivedBytes = Counter(
            "infsmtp_received_bytes", "Bytes of the messages accepted (as stored, Received: header included).",
            registry=registry,
        )
        self.auth = Counter(
            "infsmtp_auth", "AUTH attempts judged by onLogin, by result and mechanism.", ["result", "mechanism"],
            registry=registry,
        )
        self.handlerSeconds = Histogram(
            "infsmtp_handler_seconds",
            "Seconds a handler took to answer, by handler.",
            ["handler"],
            buckets=HANDLER_BUCKETS,
            registry=registry,
        )
        self.tlsSessions = Counter(
            "infsmtp_tls_sessions", "Sessions that completed a TLS handshake, by TLS version.", ["version"],
            registry=registry,
        )
        self._generate = prometheus.generate_latest
        self.contentType = prometheus.CONTENT_TYPE_LATEST

    def __call__(self, event: dict[str, Any]) -> None:
        """
        Count one session event (see L{infsmtp._events.SessionEvents}).
        """
        name = event["event"]
        if name == "accepted":
            self.accepted.inc()
            self.receivedBytes.inc(event["size"])
        elif name == "handler":
            self.handlerSeconds.labels(event["handler"]).observe(max(0.0, event["seconds"]))
        elif name == "reject":
            code, verb, reason = event["code"], event["verb"], event["reason"]
            self.rejects.labels(verb if verb in _VERBS else "other", str(code), reason).inc()
            if verb in ("MAIL", "RCPT", "DATA"):
                (self.rejected if code >= 500 else self.tempfailed).labels(reason).inc()
        elif name == "connect":
            self.sessions.inc()
        elif name == "auth":
            self.auth.labels("success" if event["success"] else "failure", event["mechanism"][:20]).inc()
        elif name == "tls":
            self.tlsSessions.labels(event["version"]).inc()

    def exposition(self) -> bytes:
        """
        The Prometheus text format of every metric, now.
        """
        return self._generate(self.registry)


#: Verbs kept as a label value (anything else is C{other}: the label's
#: values stay few whatever clients send).
_VERBS = frozenset(
    "CONNECT HELO EHLO MAIL RCPT DATA RSET NOOP QUIT VRFY EXPN HELP STARTTLS AUTH".split()
)


class MetricsPage(resource.Resource):
    """
    C{GET /metrics}: the Prometheus text, rendered in the reactor thread
    (the counters are only ever changed there).
    """

    isLeaf = True

    def __init__(self, metrics: ServerMetrics) -> None:
        super().__init__()
        self.metrics = metrics

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"Content-Type", self.metrics.contentType.encode("ascii"))
        return self.metrics.exposition()


class HealthPage(resource.Resource):
    """
    C{GET /healthz}: 200 C{ok}, or 503 and what is wrong, one per line.
    """

    isLeaf = True

    def __init__(self, smtpServer: Any) -> None:
        super().__init__()
        # Not "server": putChild sets that on every child.
        self.smtpServer = smtpServer

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        request.setHeader(b"Cache-Control", b"no-store")
        problems = self.smtpServer.health()
        if problems:
            request.setResponseCode(503)
            return ("\n".join(problems) + "\n").encode("utf-8")
        return b"ok\n"


def metricsSite(smtpServer: Any) -> Site:
    """
    The web site of the metrics listener: C{/metrics} and C{/healthz}.
    """
    root = resource.Resource()
    root.putChild(b"metrics", MetricsPage(smtpServer.enableMetrics()))
    root.putChild(b"healthz", HealthPage(smtpServer))
    site = Site(root)
    site.noisy = False
    # A scrape every few seconds is not worth an access log line each.
    site.log = lambda request: None  # type: ignore[method-assign]
    return site


def listenMetrics(reactor: Any, description: str, smtpServer: Any) -> Any:
    """
    Serve C{/metrics} and C{/healthz} for C{smtpServer} on the endpoint
    C{description} (C{tcp:9125:interface=127.0.0.1}).

    @return: a Deferred firing with the listening port.
    """
    return serverFromString(reactor, description).listen(metricsSite(smtpServer))
