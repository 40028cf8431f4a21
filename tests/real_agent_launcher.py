"""Serve the real shakenfist-agent 1.0.1 message handler on a unix socket.

Run with .venv-sfagent's python: `python real_agent_launcher.py SOCKET`. Each
connection is handed to shakenfist_agent's VSockAgentJob, exactly as the agent
daemon hands it a vsock connection (VSockAgentJob needs only recv, sendall and
close), each connection in its own thread as the daemon does.
"""

import logging
import socket
import sys
import threading

from shakenfist_agent.commandline.daemon import VSockAgentJob

path = sys.argv[1]
logging.basicConfig(level=logging.WARNING)
server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
server.bind(path)
server.listen()
print('listening', flush=True)


def serve(conn):
    try:
        VSockAgentJob(logging.getLogger('sf-agent'), conn).run()
    except OSError:
        pass        # the host went away mid-reply


while True:
    conn, _ = server.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
