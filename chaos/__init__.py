"""memkv chaos suite (issue 8 items 3-6): fault scenarios against a live cluster,
checked from a recorded history of every operation.

- :mod:`chaos.history`   the operation record and the thread-safe recorder (JSON lines)
- :mod:`chaos.checker`   pure functions over a history: the invariants
- :mod:`chaos.load`      the load generator (threads of SyncClients, every op recorded)
- :mod:`chaos.targets`   where faults are injected: local processes or the compose deployment
- :mod:`chaos.scenarios` the scenarios (``python -m chaos list``); :mod:`chaos.harsh` the harsher
                         faults of issue 19; :mod:`chaos.ctx` what a scenario works with (probes)
- :mod:`chaos.runner`    one scenario end to end: cluster, load, fault, heal, converge, verify, check
- :mod:`chaos.soak`      random, overlapping faults under load for minutes (``python -m chaos soak``)
- :mod:`chaos.report`    JSON under chaos/results/, a rich table, a Markdown table for README
- fault machinery: :mod:`chaos.netfault` + :mod:`chaos.nfqueue` (link delay/loss/reordering),
  :mod:`chaos.faultshim` (clock skew, slow fsync; chaos/shim/faultshim.c), :mod:`chaos.cgroups`
  (per-process cgroups: packet classification, memory limits), :mod:`chaos.worker` (clients in
  their own processes)

``python -m chaos run SCENARIO [--target local|compose] [--set k=v ...]`` -- docs/chaos.md
"""
