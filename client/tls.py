"""TLS options of the client library (``memkvs://`` URLs or ``connect(..., tls=...)``).

``tls`` may be ``True`` (system trust store), a path to a PEM CA bundle, or an
``ssl.SSLContext`` (e.g. one that also loads a client certificate for a node
that requires mutual TLS). The TLS session itself is part of the connection
protocol (``client/core/protocol.py``), the same for both clients.
"""

from __future__ import annotations

import ssl
from typing import Any

from memkv.errors import InvalidArgument


def client_context(tls: Any) -> ssl.SSLContext | None:
    """``None``/``False`` -> None; ``True`` -> default context; ``str`` -> CA file; a context as is."""
    if tls is None or tls is False:
        return None
    if isinstance(tls, ssl.SSLContext):
        return tls
    if tls is True:
        return ssl.create_default_context()
    if isinstance(tls, str):
        try:
            return ssl.create_default_context(cafile=tls)
        except (OSError, ssl.SSLError) as exc:
            raise InvalidArgument(f"cannot load CA file {tls}: {exc}") from None
    raise InvalidArgument("tls must be True, a CA file path or an ssl.SSLContext")
