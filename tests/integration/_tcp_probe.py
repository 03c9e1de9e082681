"""Small TCP and UDP helpers run as ``python -c SCRIPT`` inside lab hosts (filter and policy lab tests)."""

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

#: Echo every UDP datagram back to its sender, from the socket it came to: one socket per port argv[2:],
#: bound to address argv[1] ("0.0.0.0" for all), so an answer's source is the address and port asked.
UDP_ECHO = """
import selectors, socket, sys
sel = selectors.DefaultSelector()
for port in sys.argv[2:]:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((sys.argv[1], int(port)))
    sel.register(s, selectors.EVENT_READ)
print("ready", flush=True)
while True:
    for key, _ in sel.select():
        data, peer = key.fileobj.recvfrom(4096)
        key.fileobj.sendto(data, peer)
"""

#: One UDP datagram to argv[1]:argv[2], sent from source port argv[4] (0: any); exit 0 when the same bytes
#: come back from that address and port within argv[3] seconds, 2 when nothing does.
UDP_ASK = """
import os, socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[4])))
s.settimeout(float(sys.argv[3]))
ask = os.urandom(16)
s.sendto(ask, (sys.argv[1], int(sys.argv[2])))
try:
    while True:
        data, peer = s.recvfrom(4096)
        if data == ask and peer == (sys.argv[1], int(sys.argv[2])):
            sys.exit(0)
except socket.timeout:
    sys.exit(2)
"""

__all__ = ["CONNECT", "LISTEN", "UDP_ASK", "UDP_ECHO"]
