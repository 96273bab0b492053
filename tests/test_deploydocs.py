"""
The files docs/DEPLOY.rst shows, run: the systemd unit's ExecStart with a
socket passed the way systemd passes it, its ExecReload after the certbot
deploy hook renewed the certificate, and the Dockerfile's CMD.  Neither
systemd nor Docker runs here: the paths they would provide
(C{/opt/infsmtp}, C{/var/lib/infsmtp}, C{/etc/infsmtp}) are swapped for
temporary ones, and the container's C{tcp:2525} for a loopback port;
everything else on those command lines is used as written.
(HAProxy's configuration runs in test_haproxy.py.)
"""

from __future__ import annotations

import grp
import json
import os
import re
import shlex
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import sys

import pytest
from twistdprocess import DEADLINE, REPO, TWISTD, childEnvironment, maildirFiles, poll

from infsmtp._daemon.twistd import Options

DEPLOY = os.path.join(REPO, "docs", "deploy")

MESSAGE = b"From: alice@example.org\r\nTo: bob@example.net\r\nSubject: deployed\r\n\r\nHello.\r\n"


def unitFile(name: str) -> dict[str, dict[str, list[str]]]:
    """
    A systemd unit file: section -> key -> values (a key may repeat;
    a backslash continues a line, as systemd reads it).
    """
    with open(os.path.join(DEPLOY, name), encoding="utf-8") as f:
        text = f.read().replace("\\\n", " ")
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def relocated(argv: list[str], places: dict[str, str]) -> list[str]:
    """
    C{argv} with each production path prefix replaced by a test one.
    """
    out = []
    for arg in argv:
        for production, here in places.items():
            arg = arg.replace(production, here)
        out.append(arg)
    return out


def pluginArguments(argv: list[str]) -> list[str]:
    """
    What follows C{infsmtp} on a twistd command line, checked by the
    plugin's own option parser (an unknown or misspelt option fails here).
    """
    assert os.path.basename(argv[0]) == "twistd" and "-n" in argv and "--pidfile=" in argv, argv
    args = argv[argv.index("infsmtp") + 1 :]
    Options().parseOptions(args)
    return args


class Started:
    """
    A server started from a deployment file's command line, logging to
    standard output as it does under systemd or Docker.
    """

    def __init__(self, argv: list[str], cwd: str, **popen) -> None:
        self.stdoutPath = os.path.join(cwd, "stdout.log")
        with open(self.stdoutPath, "wb") as out:
            self.process = subprocess.Popen(
                argv, cwd=cwd, env=childEnvironment(), stdout=out, stderr=subprocess.STDOUT, **popen
            )

    def log(self) -> str:
        with open(self.stdoutPath, encoding="utf-8", errors="replace") as f:
            return f.read()

    def waitLog(self, pattern: str) -> re.Match:
        def found():
            match = re.search(pattern, self.log())
            if match is None and self.process.poll() is not None:
                raise AssertionError(f"exited ({self.process.returncode}) before logging {pattern!r}:\n{self.log()}")
            return match

        return poll(found, what=repr(pattern))

    def stop(self, deadline: float) -> int:
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(deadline)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)
            raise AssertionError(f"still running {deadline}s after SIGTERM:\n{self.log()}") from None

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)


def runHook(lineage: str, tlsDir: str, reload: str) -> None:
    env = dict(
        os.environ,
        RENEWED_LINEAGE=lineage,
        INFSMTP_TLS_DIR=tlsDir,
        INFSMTP_GROUP=grp.getgrgid(os.getgid()).gr_name,
        INFSMTP_RELOAD=reload,
    )
    hook = os.path.join(DEPLOY, "certbot-deploy-hook")
    result = subprocess.run([hook], env=env, capture_output=True, text=True, timeout=DEADLINE, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def renew(lineage: str, issued) -> None:
    """
    What certbot leaves in C{/etc/letsencrypt/live/NAME} after a renewal.
    """
    os.makedirs(lineage, exist_ok=True)
    shutil.copyfile(issued.certFile, os.path.join(lineage, "fullchain.pem"))
    shutil.copyfile(issued.keyFile, os.path.join(lineage, "privkey.pem"))


def servedCertificate(port: int, caFile: str) -> bytes:
    """
    The certificate a new STARTTLS session gets (DER), verified against
    the test CA; a message goes through in the same session.
    """
    context = ssl.create_default_context(cafile=caFile)
    with smtplib.SMTP("::1", port, local_hostname="client.test", timeout=10) as client:
        client.starttls(context=context)
        client.sendmail("alice@example.org", ["bob@example.net"], MESSAGE)
        return client.sock.getpeercert(binary_form=True)


def pemToDer(path: str) -> bytes:
    with open(path, encoding="ascii") as f:
        return ssl.PEM_cert_to_DER_cert(f.read())


def test_systemdUnitAndCertbotRenewal(tmp_path, certificateAuthority):
    """
    infsmtp.service's ExecStart, given infsmtp.socket's socket as systemd
    gives it (descriptor 3, LISTEN_FDS, LISTEN_PID), serves STARTTLS with
    the certificate the certbot hook installed and delivers into the
    Maildir; after a renewal the hook's ExecReload makes new sessions get
    the new certificate; SIGTERM ends it with status 0 within
    TimeoutStopSec.
    """
    socketUnit, serviceUnit = unitFile("infsmtp.socket"), unitFile("infsmtp.service")
    assert socketUnit["Socket"]["ListenStream"] == ["[::]:25"]
    assert socketUnit["Socket"]["BindIPv6Only"] == ["both"]
    service = serviceUnit["Service"]
    assert service["User"] == ["infsmtp"] and "AmbientCapabilities" not in service  # the socket is systemd's
    [execStart], [execReload], [stopTimeout] = service["ExecStart"], service["ExecReload"], service["TimeoutStopSec"]
    args = pluginArguments(shlex.split(execStart))
    assert args[args.index("--listen") + 1] == "systemd:domain=INET6:index=0"
    assert float(args[args.index("--grace") + 1]) < float(stopTimeout)

    state, tlsDir, lineage = tmp_path / "state", tmp_path / "tls", str(tmp_path / "live" / "mx.example.org")
    state.mkdir()
    tlsDir.mkdir()
    places = {"/opt/infsmtp/bin/twistd": TWISTD, "/var/lib/infsmtp": str(state), "/etc/infsmtp/tls": str(tlsDir)}
    [workingDirectory] = relocated(service["WorkingDirectory"], places)
    assert workingDirectory == str(state)

    # The first certificate, installed by the hook before infsmtp runs.
    first = certificateAuthority.issue("localhost", "::1", prefix="first")
    renew(lineage, first)
    runHook(lineage, str(tlsDir), reload="true")
    assert oct(os.stat(tlsDir / "privkey.pem").st_mode & 0o777) == "0o640"

    listening = socket.socket(socket.AF_INET6)
    listening.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    listening.bind(("::1", 0))
    listening.listen(1024)
    port, fd = listening.getsockname()[1], listening.fileno()
    # systemd's hand-over: the socket as descriptor 3, and the variables
    # naming this very process (bash exec keeps the pid).
    handOver = "" if fd == 3 else f"exec 3<&{fd} {fd}<&-; "
    handOver += 'export LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES=infsmtp.socket; exec "$@"'
    argv = relocated(shlex.split(execStart), places)
    child = Started(["bash", "-c", handOver, "systemd", *argv], workingDirectory, pass_fds=[fd])
    listening.close()
    try:
        child.waitLog(rf"infsmtp listening on \[::1\]:{port} \(STARTTLS\)")
        assert servedCertificate(port, certificateAuthority.certFile) == pemToDer(first.certFile)
        [stored] = maildirFiles(state / "Maildir")
        with open(state / "Maildir" / "new" / stored, "rb") as f:
            assert b"\nReceived: from client.test ([::1])\n\tby mx.example.org (infsmtp) with ESMTPS" in f.read()

        second = certificateAuthority.issue("localhost", "::1", prefix="second")
        renew(lineage, second)
        runHook(lineage, str(tlsDir), reload=execReload.replace("$MAINPID", str(child.process.pid)))
        child.waitLog(r"SIGHUP: reloaded certificate")
        assert servedCertificate(port, certificateAuthority.certFile) == pemToDer(second.certFile)
        assert len(maildirFiles(state / "Maildir")) == 2

        assert child.stop(float(stopTimeout)) == 0, child.log()
    finally:
        child.kill()


def dockerfile() -> dict[str, list[str]]:
    instructions: dict[str, list[str]] = {}
    with open(os.path.join(DEPLOY, "Dockerfile"), encoding="utf-8") as f:
        text = f.read().replace("\\\n", " ")
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            keyword, _, rest = line.strip().partition(" ")
            instructions.setdefault(keyword.upper(), []).append(rest.strip())
    return instructions


#: Seconds "docker stop" waits after SIGTERM before SIGKILL, by default.
DOCKER_STOP_TIMEOUT = 10


def test_dockerfileCommand(tmp_path):
    """
    The Dockerfile's CMD: not root, listening on every address of the
    container on the EXPOSEd port, the Maildir in the VOLUME, a grace
    under docker stop's timeout; run, it delivers, leaves no pid file that
    would stop the next start, and exits 0 on SIGTERM.
    """
    instructions = dockerfile()
    [user], [workdir], [volume], [expose], [cmd] = (
        instructions[k] for k in ("USER", "WORKDIR", "VOLUME", "EXPOSE", "CMD")
    )
    assert user not in ("root", "0")
    argv = json.loads(cmd)  # the exec form: twistd is PID 1 and gets the SIGTERM itself
    args = pluginArguments(argv)
    assert args[args.index("--listen") + 1] == f"tcp:{expose}"  # no interface=: every address
    maildir = args[args.index("--maildir") + 1]
    assert maildir.startswith(volume + "/") and workdir == volume
    grace = float(args[args.index("--grace") + 1])
    assert grace < DOCKER_STOP_TIMEOUT

    volumeHere = tmp_path / "volume"
    volumeHere.mkdir()
    argv = relocated(argv, {volume: str(volumeHere)})
    argv[0] = TWISTD
    # The only change: a loopback port chosen by the kernel for the
    # container's tcp:2525 (the same endpoint type, one address).
    argv[argv.index(f"tcp:{expose}")] = "tcp:0:interface=127.0.0.1"
    for _start in ("first", "restart"):  # the restart finds no pid file in its way
        child = Started(argv, str(volumeHere))
        try:
            port = int(child.waitLog(r"infsmtp listening on 127\.0\.0\.1:(\d+) \(plaintext\)").group(1))
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
                assert client.sendmail("alice@example.org", ["bob@example.net"], MESSAGE) == {}
            assert not os.path.exists(volumeHere / "twistd.pid")
            assert child.stop(DOCKER_STOP_TIMEOUT) == 0, child.log()
        finally:
            child.kill()
    assert len(maildirFiles(volumeHere / "Maildir")) == 2


def test_dockerfileCopiesEnoughToInstall(tmp_path):
    """
    The Dockerfile's COPY lines bring everything "pip install /src" needs:
    done here with those files only (no dependencies, no network), the
    package and the twistd plugin are installed.
    """
    source, target = tmp_path / "src", tmp_path / "site"
    for copy in dockerfile()["COPY"]:
        *paths, destination = copy.split()
        assert destination.startswith("/src/"), copy
        for path in paths:
            here = os.path.join(REPO, path)
            there = os.path.join(
                source, destination.removeprefix("/src/"), os.path.basename(path) if destination.endswith("/") else ""
            )
            if os.path.isdir(here):
                shutil.copytree(here, there, ignore=shutil.ignore_patterns("__pycache__", "dropin.cache"))
            else:
                os.makedirs(os.path.dirname(there), exist_ok=True)
                shutil.copyfile(here, there)
    [run] = [r for r in dockerfile()["RUN"] if "pip install" in r]
    assert "pip install --no-cache-dir /src " in run
    pip = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "-q",
        "--no-deps",
        "--no-build-isolation",
        "--target",
        str(target),
        str(source),
    ]
    result = subprocess.run(pip, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (target / "infsmtp" / "__init__.py").is_file()
    assert (target / "twisted" / "plugins" / "infsmtp_plugin.py").is_file()


@pytest.mark.parametrize(
    "name", ["infsmtp.service", "infsmtp.socket", "Dockerfile", "haproxy.cfg", "certbot-deploy-hook"]
)
def test_deployDocShowsTheTestedFiles(name):
    """
    DEPLOY.rst includes each file from docs/deploy/ rather than a copy.
    """
    with open(os.path.join(REPO, "docs", "DEPLOY.rst"), encoding="utf-8") as f:
        assert f".. literalinclude:: deploy/{name}\n" in f.read()
