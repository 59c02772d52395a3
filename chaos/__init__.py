"""memkv chaos suite (issue 8 items 3-6): fault scenarios against a live cluster,
checked from a recorded history of every operation.

- :mod:`chaos.history`   the operation record and the thread-safe recorder (JSON lines)
- :mod:`chaos.checker`   pure functions over a history: the invariants
- :mod:`chaos.load`      the load generator (threads of SyncClients, every op recorded)
- :mod:`chaos.targets`   where faults are injected: local processes or the compose deployment
- :mod:`chaos.scenarios` the scenarios (``python -m chaos list``)
- :mod:`chaos.runner`    one scenario end to end: cluster, load, fault, heal, converge, verify, check
- :mod:`chaos.report`    JSON under chaos/results/, a rich table, a Markdown table for README

``python -m chaos run SCENARIO [--target local|compose] [--set k=v ...]``
"""
