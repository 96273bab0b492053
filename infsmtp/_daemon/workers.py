"""
Several worker processes sharing listening sockets, so one machine's every
core serves (``twistd -n infsmtp --workers N``).

Twisted's documented pattern: the parent binds and listens, then starts N
children that inherit the listening descriptors and adopt them
(``IReactorSocket.adoptStreamPort``); the kernel hands each new connection
to whichever child accepts first.  The parent accepts nothing itself: it
restarts a worker that dies and, on SIGTERM, passes the signal on and waits
for every worker to finish its transactions.

With C{reusePort} (C{--workers-sockets reuseport}, Linux's
C{SO_REUSEPORT}) the parent binds one socket per worker on the same port
instead, and each worker adopts its own: the kernel spreads connections
over the sockets by their addresses, and only the worker whose socket has
one is woken.  The parent keeps every socket open, so a restarted worker
takes over the connections waiting on its predecessor's.
"""

from __future__ import annotations

import os
import socket
import sys
from typing import Any, Sequence

from twisted.application import service
from twisted.internet import defer, protocol
from twisted.internet.endpoints import AdoptedStreamServerEndpoint
from twisted.logger import Logger

from .._events import isRotatable

log = Logger(namespace="infsmtp.workers")


def parseTCPListen(description: str) -> tuple[str, int, int]:
    """
    C{'tcp:2525:interface=127.0.0.1'} (or C{tcp6:...}) -> (interface, port,
    address family).  Workers share TCP listeners only.

    @raise ValueError: another kind of endpoint.
    """
    parts = description.split(":")
    kind = parts[0].lower()
    if kind not in ("tcp", "tcp6") or len(parts) < 2:
        raise ValueError(f"--workers shares tcp: listeners only, not {description!r}")
    fields: dict[str, str] = {}
    positional = []
    for part in parts[1:]:
        if "=" in part:
            key, value = part.split("=", 1)
            fields[key] = value
        else:
            positional.append(part)
    port = int(fields.get("port", positional[0] if positional else "0"))
    family = socket.AF_INET6 if kind == "tcp6" else socket.AF_INET
    interface = fields.get("interface", "::" if family == socket.AF_INET6 else "")
    return interface, port, family


def bindListener(description: str, backlog: int = 1024, reusePort: bool = False, port: int | None = None) -> socket.socket:
    """
    Bind and listen as a TCP endpoint string says; the socket is
    inheritable so that workers can adopt it.

    @param reusePort: set C{SO_REUSEPORT}, so that more sockets may listen
        on the same port (one per worker).
    @param port: the port to bind instead of the description's (the one
        the first of several such sockets got, when it asked for port 0).
    """
    interface, described, family = parseTCPListen(description)
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reusePort:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((interface, described if port is None else port))
    sock.listen(backlog)
    sock.setblocking(False)
    os.set_inheritable(sock.fileno(), True)
    return sock


#: How many waiting connections a worker accepts per wake-up.
ACCEPTS_PER_WAKEUP = 16


class SharedListenerEndpoint(AdoptedStreamServerEndpoint):
    """
    A listening descriptor shared with the other workers, adopted so that
    one wake-up accepts at most L{ACCEPTS_PER_WAKEUP} connections.

    Every worker's reactor is woken when connections wait, and Twisted's
    port accepts as many as it can per wake-up (100, and growing): a burst
    of connections, such as a client opening its sessions at once, went to
    whichever worker woke first (2,000 messages over smtp-source's 20
    reused connections split 445 / 1,555).  With 16, twelve runs split
    34-45 % / 55-66 %, and --workers 2 went from 1.00x to 1.32x --workers 1
    there.  One accept per wake-up shared bursts more evenly still, but
    cost a wake-up per connection: 0.77x with 500 sessions connecting
    anew for every message, against 0.94x with 16.
    """

    def listen(self, factory: Any) -> defer.Deferred:
        def limitAccepts(port: Any) -> Any:
            doRead = port.doRead

            def acceptSome() -> None:
                # tcp.Port scales this after every wake-up; pin it back.
                port.numberAccepts = ACCEPTS_PER_WAKEUP
                doRead()

            port.doRead = acceptSome
            return port

        return super().listen(factory).addCallback(limitAccepts)


def adoptedEndpoint(reactor: Any, fd: int) -> SharedListenerEndpoint:
    """
    The endpoint a worker listens on: the descriptor its parent passed.
    """
    probe = socket.socket(fileno=os.dup(fd))
    try:
        addressFamily = probe.family
    finally:
        probe.close()
    return SharedListenerEndpoint(reactor, fd, addressFamily)


class _WorkerProtocol(protocol.ProcessProtocol):
    def __init__(self, pool: "WorkerPool", index: int) -> None:
        self.pool = pool
        self.index = index
        self.ended: defer.Deferred = defer.Deferred()

    def processEnded(self, reason: Any) -> None:
        self.ended.callback(None)
        self.pool._workerEnded(self, reason)


class WorkerPool(service.Service):
    """
    Bind the listeners, run C{count} workers that adopt them, restart the
    ones that die, stop them all with SIGTERM.

    @param listens: TCP endpoint strings to bind.
    @param pluginArgs: the infsmtp options of a worker (C{--inherit-fd FD}
        is added for each listener).
    @param logfile: the parent's log file; worker I{n} logs to
        C{LOGFILE.worker}I{n} (twistd's log files rotate, so they are not
        shared), to the same path when it is not a regular file (such as
        C{/dev/null}, never rotated), or to standard output when L{None}.
    @param reusePort: one C{SO_REUSEPORT} socket per worker and listener,
        instead of one socket all workers share (see the module docstring).
    """

    def __init__(
        self,
        listens: Sequence[str],
        count: int,
        pluginArgs: Sequence[str],
        logfile: str | None = None,
        reactor: Any = None,
        reusePort: bool = False,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.listens = list(listens)
        self.count = count
        self.pluginArgs = list(pluginArgs)
        self.logfile = logfile
        self.reusePort = reusePort
        #: Every listening socket (the parent keeps them all open).
        self.sockets: list[socket.socket] = []
        #: Worker index -> the sockets it adopts.
        self.socketsOf: dict[int, list[socket.socket]] = {}
        self.workers: dict[int, _WorkerProtocol] = {}
        self.restarts = 0
        self._stopping = False

    def bind(self) -> None:
        """
        Bind the listeners (before twistd sheds privileges or daemonizes;
        the descriptors survive both).

        @raise OSError: e.g. a port in use.
        """
        if self.sockets:
            return
        if not self.reusePort:
            self.sockets = [bindListener(description) for description in self.listens]
            self.socketsOf = dict.fromkeys(range(self.count), self.sockets)
            return
        self.socketsOf = {index: [] for index in range(self.count)}
        try:
            for description in self.listens:
                first = bindListener(description, reusePort=True)
                # Port 0 asked: the others take the port the first got.
                port = first.getsockname()[1]
                mine = [first] + [
                    bindListener(description, reusePort=True, port=port) for _ in range(self.count - 1)
                ]
                self.sockets += mine
                for index, sock in enumerate(mine):
                    self.socketsOf[index].append(sock)
        except OSError:
            for sock in self.sockets:
                sock.close()
            self.sockets, self.socketsOf = [], {}
            raise

    def startService(self) -> None:
        super().startService()
        self.bind()
        for sock in self.socketsOf.get(0, self.sockets):
            interface, port = sock.getsockname()[:2]
            log.info(
                "infsmtp workers {how} {interface}:{port}",
                how="each listen (SO_REUSEPORT) on" if self.reusePort else "share",
                interface=interface or "*",
                port=port,
            )
        for index in range(self.count):
            self._spawn(index)

    def _spawn(self, index: int) -> None:
        if not self.logfile:
            logfile = "-"
        elif isRotatable(self.logfile):
            logfile = f"{self.logfile}.worker{index}"
        else:
            # /dev/null or a FIFO: never rotated, so it can be shared (and
            # "/dev/null.worker0" would be a regular file growing in /dev).
            logfile = self.logfile
        # twistd's own entry point (python -m twisted would run "twist").
        argv = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]
        argv += ["--nodaemon", "--pidfile=", "--logfile", logfile, "infsmtp", *self.pluginArgs]
        # Its session ids are its own, and its log lines say who wrote them.
        argv += ["--worker", f"{index}/{self.count}"]
        childFDs: dict[int, Any] = {0: "w", 1: 1, 2: 2}
        for sock in self.socketsOf[index]:
            fd = sock.fileno()
            childFDs[fd] = fd
            argv += ["--inherit-fd", str(fd)]
        worker = _WorkerProtocol(self, index)
        env = os.environ.copy()
        # systemd hears from the parent only (the main process).
        env.pop("NOTIFY_SOCKET", None)
        self.reactor.spawnProcess(worker, argv[0], argv, env=env, childFDs=childFDs)
        self.workers[index] = worker
        log.info("infsmtp worker {index} started (pid {pid})", index=index, pid=worker.transport.pid)

    def _workerEnded(self, worker: _WorkerProtocol, reason: Any) -> None:
        if self.workers.get(worker.index) is worker:
            del self.workers[worker.index]
        if self._stopping:
            return
        self.restarts += 1
        log.warn(
            "infsmtp worker {index} ended ({reason}); starting another",
            index=worker.index,
            reason=reason.getErrorMessage(),
        )
        # A worker that fails at once would otherwise spin: wait a little.
        self.reactor.callLater(0.5, self._respawn, worker.index)

    def _respawn(self, index: int) -> None:
        if not self._stopping and index not in self.workers:
            self._spawn(index)

    def stopService(self) -> defer.Deferred:
        """
        SIGTERM every worker (each finishes its transactions, see the
        server's graceful stop) and wait until all have exited.
        """
        super().stopService()
        self._stopping = True
        ended = []
        for worker in list(self.workers.values()):
            ended.append(worker.ended)
            try:
                worker.transport.signalProcess("TERM")
            except Exception:
                pass
        for sock in self.sockets:
            sock.close()
        return defer.DeferredList(ended).addCallback(lambda _: None)


def workerArguments(argv: Sequence[str]) -> tuple[list[str], str | None]:
    """
    From the parent's C{twistd [options] infsmtp [options]} command line:
    the infsmtp options without C{--workers}, and the parent's log file
    (L{None} when it logs to standard output).
    """
    args = list(argv)
    try:
        at = args.index("infsmtp")
    except ValueError:
        raise ValueError("--workers needs twistd's infsmtp subcommand on the command line") from None
    logfile = None
    for index, arg in enumerate(args[:at]):
        if arg in ("--logfile", "-l") and index + 1 < at:
            logfile = args[index + 1]
        elif arg.startswith("--logfile="):
            logfile = arg.split("=", 1)[1]
    pluginArgs: list[str] = []
    skip = False
    for arg in args[at + 1 :]:
        if skip:
            skip = False
        elif arg == "--workers":
            skip = True
        elif not arg.startswith("--workers="):
            pluginArgs.append(arg)
    return pluginArgs, (None if logfile in (None, "-") else logfile)
