"""Small TCP helpers run as ``python -c SCRIPT`` inside lab hosts (filter and policy lab tests)."""

#: Listen on TCP ports argv[1:] (the kernel completes handshakes from the backlog; nothing is accepted).
LISTEN = """
import socket, sys, time
socks = []
for port in sys.argv[1:]:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", int(port)))
    s.listen(16)
    socks.append(s)
print("ready", flush=True)
time.sleep(3600)
"""

#: Exit 0 when a TCP connection to argv[1]:argv[2] opens within argv[3] seconds, 1 otherwise.
CONNECT = """
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3])).close()
except OSError as e:
    print(e)
    sys.exit(1)
"""

__all__ = ["CONNECT", "LISTEN"]
