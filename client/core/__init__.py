"""The client core: everything a client does, as sans-IO operations (no sockets, threads or clocks).

``api.py`` (the §9 API as operations) over ``ops.py`` (each operation),
``dispatch.py`` (failover, replicated writes, MOVED), ``repair.py``
(fallback, newest version, read repair), ``onesided.py`` (reads through a
one-sided transport), ``routing.py`` (which nodes hold a key) and
``chains.py`` (prefix chains for the engine integrations); requests and
replies are ``calls.py`` over one connection's ``protocol.py``. What an
operation asks of an executor is ``requests.py``.
"""
