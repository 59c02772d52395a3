"""pyetcd's client with a timeout for each call instead of one for the client.

pyetcd passes its client's ``timeout`` attribute to every RPC. The etcd adapter
(``client/etcd.py``) needs a different one per call: a call that may be sent
again gets a share of its budget for each attempt (so that a member which holds
a request without answering -- a follower while the members elect a leader --
leaves time to ask another), a transaction the whole budget. The adapter is used
from many threads at once, so the timeout is the calling thread's own: set for
one call by ``attempt``, the client's default otherwise.

Its own module because it imports pyetcd (and so gRPC) when it is loaded; the
adapter loads it only when it connects.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import pyetcd


class AttemptClient(pyetcd.MultiEndpointEtcd3Client):
    def __init__(self, *args: object, **kwargs: object) -> None:
        self._attempt = threading.local()
        self._default_timeout: float | None = None
        super().__init__(*args, **kwargs)

    @property  # type: ignore[override]
    def timeout(self) -> float | None:
        """What pyetcd gives each RPC: this thread's attempt timeout, or the client's."""
        return getattr(self._attempt, "timeout", self._default_timeout)

    @timeout.setter
    def timeout(self, value: float | None) -> None:
        self._default_timeout = value  # (pyetcd's constructor sets it)

    @contextlib.contextmanager
    def attempt(self, seconds: float) -> Iterator[None]:
        """RPCs of this thread within the block time out after ``seconds``."""
        self._attempt.timeout = seconds
        try:
            yield
        finally:
            del self._attempt.timeout
