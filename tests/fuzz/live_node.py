"""One fuzz input thrown at a live node's port: what the atheris harnesses and tests/test_hardening.py share.

A node must answer any bytes, however malformed, and then let the connection end: the client
half-closes after sending, and the node's replies (or its close after a protocol error) must
arrive within ``timeout``. A node that keeps the connection busy or goes silent is a hang,
which is what the fuzzing looks for.
"""

from __future__ import annotations

import socket
import time


class NodeHung(AssertionError):
    """The node neither finished answering nor closed the connection in time."""


def send_and_read(s: socket.socket, data: bytes, timeout: float = 5.0) -> bytes:
    """Send ``data`` on ``s``, half-close it and read to EOF; the bytes the node sent back.

    ``b""`` when the node closed before taking all of ``data`` (it refused the input: that is an
    answer). A reset after some replies ends the read with what came before it.
    """
    try:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
    except OSError:
        return b""
    s.settimeout(timeout)
    buf = bytearray()
    t0 = time.monotonic()
    try:
        while chunk := s.recv(1 << 20):
            buf += chunk
            if time.monotonic() - t0 > timeout:
                raise NodeHung(f"node kept the connection busy after {data[:80]!r}")
    except ConnectionResetError:
        pass
    except TimeoutError:
        raise NodeHung(f"node hung on {data[:80]!r}") from None
    return bytes(buf)


def exchange(host: str, port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """``send_and_read`` on a fresh connection, closed afterwards."""
    with socket.create_connection((host, port), timeout=timeout) as s:
        return send_and_read(s, data, timeout)
