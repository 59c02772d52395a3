"""Container healthcheck of a memkv node (stdlib only, so it costs ~30 ms of CPU).

Healthy when the node answers a RESP ``PING`` with ``+PONG`` on its RESP port and
serves ``/metrics`` on its metrics port (each skipped when its port is unset/empty).
Exit 0 = healthy, 1 = not.
"""

import os
import socket
import sys
import urllib.request

TIMEOUT = float(os.environ.get("MEMKV_HEALTH_TIMEOUT", "3"))


def resp_ping(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as s:
        s.sendall(b"*1\r\n$4\r\nPING\r\n")
        reply = s.recv(64)
    if not reply.startswith(b"+PONG"):
        raise RuntimeError(f"RESP PING answered {reply!r}")


def metrics(port: int) -> None:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=TIMEOUT) as r:
        if r.status != 200:
            raise RuntimeError(f"/metrics answered HTTP {r.status}")


def memkv_port(listen: str) -> None:
    port = int(listen.rpartition(":")[2])
    socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT).close()


def main() -> int:
    checks = [("memkv port", memkv_port, os.environ.get("MEMKV_LISTEN", "0.0.0.0:7400"))]
    resp = os.environ.get("MEMKV_RESP_PORT", "6379")
    if resp:
        checks.append(("RESP PING", resp_ping, int(resp)))
    met = os.environ.get("MEMKV_METRICS_PORT", "9400")
    if met:
        checks.append(("metrics", metrics, int(met)))
    for name, fn, arg in checks:
        try:
            fn(arg)
        except Exception as exc:  # noqa: BLE001 - any failure is "unhealthy"
            print(f"unhealthy: {name}: {exc}", file=sys.stderr)
            return 1
    print("healthy")
    return 0


if __name__ == "__main__":
    sys.exit(main())
