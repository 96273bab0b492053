# A handler script for onReceive: reads the parsed message, refuses
# messages whose subject says so, and keeps what it saw in session.data.
import threading

subject = session.message["Subject"]
session.data["seen"] = (subject, session.mailFrom, list(session.rcptTo), len(session.msg))
session.data["receiveThread"] = threading.current_thread().name
session.received = "reject" not in subject
