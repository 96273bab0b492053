"""
The ``infinity.smtp`` reference's client example, in Python.

The reference (JavaScript)::

    let myClient = new infinity.smtp.client();
    try {
        myClient.host = 'smtp.gmail.com';
        myClient.port = 465;
        myClient.encryptMode = infinity.smtp.client.encryptMode.sslTls;
        myClient.authMode = infinity.smtp.client.authMode.default;
        myClient.username = 'youraccount@gmail.com';
        myClient.password = 'yourpassword';
        myClient.connect();
        myClient.authenticate();
        myClient.send('mail.eml');
        myClient.disconnect();
    } finally {
        myClient.free();
    }

Run it against any server (the defaults are the reference's)::

    python examples/reference_example.py smtp.gmail.com 465 \\
        --username youraccount@gmail.com --password yourpassword

    # A local test server with a private CA:
    python examples/reference_example.py 127.0.0.1 8465 --ca-file ca.pem

Without ``--eml``, the reference's ``mail.eml`` is written to a temporary
file and sent.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

from infsmtp import Client

# The reference's mail.eml.  Its page shows "format=flowed" on a line of its
# own and no blank line before the body, which is how a web page renders a
# folded header and a paragraph break; this is the message it means.
MAIL_EML = (
    "To: recipientName@domain.com\r\n"
    "From: youraccount@gmail.com\r\n"
    "Subject: The Subject\r\n"
    "X-Sender: youraccount@gmail.com\r\n"
    "Content-Type: text/plain; charset=US-ASCII;\r\n"
    " format=flowed\r\n"
    "Content-Transfer-Encoding: 7bit\r\n"
    "\r\n"
    "Mailbody text\r\n"
)


def sendLikeTheReference(
    host: str,
    port: int,
    username: str,
    password: str,
    emlFile: str,
    caCertFile: str | None = None,
) -> None:
    """
    The reference's steps, one for one.
    """
    myClient = Client()
    try:
        myClient.host = host
        myClient.port = port
        myClient.encryptMode = Client.encryptMode.sslTls
        myClient.authMode = Client.authMode.default
        myClient.username = username
        myClient.password = password
        myClient.caCertFile = caCertFile  # None: the system's trust roots.
        myClient.connect()
        # The reference ignores the result; a refused login would then fail
        # at the send.  Saying so here is kinder.
        if not myClient.authenticate():
            raise SystemExit("the server refused the username or password")
        myClient.send(emlFile)
        myClient.disconnect()
    finally:
        myClient.free()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("host", nargs="?", default="smtp.gmail.com")
    parser.add_argument("port", nargs="?", type=int, default=465)
    parser.add_argument("--username", default="youraccount@gmail.com")
    parser.add_argument("--password", default="yourpassword")
    parser.add_argument("--ca-file", help="PEM trust roots instead of the system's")
    parser.add_argument("--eml", help="the message to send (default: the reference's mail.eml)")
    options = parser.parse_args(argv)

    emlFile = options.eml
    temporary = None
    if emlFile is None:
        fd, temporary = tempfile.mkstemp(suffix=".eml")
        with os.fdopen(fd, "w", newline="") as f:
            f.write(MAIL_EML)
        emlFile = temporary
    try:
        sendLikeTheReference(
            options.host, options.port, options.username, options.password, emlFile, options.ca_file
        )
    finally:
        if temporary:
            os.unlink(temporary)
    print(f"sent {emlFile if options.eml else 'mail.eml'} through {options.host}:{options.port}")


if __name__ == "__main__":
    main(sys.argv[1:])
