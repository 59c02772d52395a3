"""One-sided transports: the client copies a value out of a node's region itself (docs/transports.md).

A transport reads bytes at offsets of one node's region — a shared-memory
mapping (``shm.py``) or RDMA READs (``rdma.py``) — and nothing else: what to
read, whether to trust it and when to fall back to TCP is decided by the
client core (``client/core/onesided.py``), through the interface of
``base.py``.
"""
