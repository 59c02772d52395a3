"""Operation codes and frame flags of the memkv wire protocol."""

from __future__ import annotations

import enum


class Op(enum.IntEnum):
    CONNECTION = 0  # only in error replies about the connection itself (framing lost)
    PING = 1
    HELLO = 2  # start of authentication: the node answers with a nonce
    AUTH = 3  # tenant + HMAC proof over both nonces
    PUT = 10
    GET = 11
    DELETE = 12
    PUT_MANY = 13
    GET_MANY = 14
    EXISTS_MANY = 15
    PIN = 16
    UNPIN = 17
    LOOKUP_PREFIX = 18
    LOCATE = 19  # descriptors for one-sided reads (shared memory, RDMA)
    STATS = 20
    REPORT_CORRUPT = 21  # a reader saw a checksum mismatch
    DELETE_MANY = 22  # versioned deletes of many keys (read repairs, slot copies, anti-entropy)
    RELAY = 23  # an owner hands a write on to an owner the client could not reach (memkv/cluster/relay.py)
    # Control plane and admin operations (cluster, security) use 40+.
    ADMIN = 40
    # Slot migration (memkv/cluster/migration.py): rebalancer -> node, node -> node.
    SLOT_SIZES = 61
    MIGRATE_PUSH = 62
    DROP_SLOTS = 63
    SLOT_VERSIONS = 64  # the versions a node holds of given keys: a freeing node hands off what owners lack
    # Anti-entropy (memkv/cluster/anti_entropy.py): node -> node.
    SLOT_DIGESTS = 65  # one digest per slot of the (key, version, kind) states a node holds
    SLOT_STATES = 66  # the (key, version, kind) states a node holds in some slots


class Flag(enum.IntFlag):
    NONE = 0
    RESPONSE = 1
    ERROR = 2
