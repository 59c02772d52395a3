"""Deterministic simulation of memkv's control plane (FoundationDB / TigerBeetle style).

The real rebalancer (``memkv.cluster.rebalancer``), the real migration programs
(``memkv.cluster.migration_job``), slot maps, ring and ownership rule run against an in-memory
etcd (``etcd``), in-memory nodes (``node``), standalone rebalancer candidates (``candidate``) and a
writing client (``client``), on simulated time with one seeded RNG (``loop``), over a network
model that delays, times out and reorders (``net``). A :class:`~memkv.cluster.sim.scenario.Scenario`
(topology, settings, faults) drawn from a seed runs in a :class:`~memkv.cluster.sim.world.World`;
the :mod:`~memkv.cluster.sim.checker` checks the invariants as it runs. A run is a function of its
seed: ``python -m memkv.cluster.sim run SEED --trace`` replays one, ``python -m memkv.cluster.sim
many`` runs many, ``python -m memkv.cluster.sim scale`` sizes a large cluster.
"""
