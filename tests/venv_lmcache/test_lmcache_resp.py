"""LMCache's own Redis clients against memkv's RESP port (``memkv serve --resp-port``), unmodified.

Three of LMCache's RESP paths, each with the replies it relies on (``+OK`` for
SET, a bulk string of exactly the stored length or ``$-1`` for GET, ``:0`` /
``:1`` for EXISTS):

- ``remote_url: redis://HOST:PORT`` — LMCache's ``RedisConnector`` (redis-py
  asyncio; a ``kv_bytes`` and a ``metadata`` key per chunk), driven through
  LMCache's StorageManager;
- ``remote_url: resp://HOST:PORT`` — ``RESPConnector`` over LMCache's native
  C++ client (``lmcache_redis``), same driver;
- the ``resp`` L2 adapter of LMCache's multiprocess mode
  (``NativeConnectorL2Adapter`` over the same C++ client), driven through its
  store / lookup-and-lock / load task interface.
"""

from __future__ import annotations

import asyncio
import socket
import time

import pytest
from engine_packages import require

require("lmcache", "bash scripts/engine-venv.sh lmcache")

from lmcache.v1.distributed.api import ObjectKey  # noqa: E402
from lmcache.v1.distributed.l2_adapters.factory import create_l2_adapter_from_registry  # noqa: E402
from lmcache.v1.distributed.l2_adapters.resp_l2_adapter import RESPL2AdapterConfig  # noqa: E402
from lmcache_harness import CHUNK, Managers, chunk_keys, fill  # noqa: E402

DEADLINE_S = 15.0


@pytest.fixture
def managers():
    made = Managers()
    yield made
    made.close()


@pytest.fixture
def resp_node(start_node):
    from conftest import free_port

    port = free_port()
    node = start_node("--resp-port", str(port))
    node.resp_port = port
    return node


def resp_exchange(port: int, command: bytes) -> bytes:
    """Send one raw RESP command and read its whole reply (the replies here are small)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(command)
        time.sleep(0.05)
        s.settimeout(0.5)
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
                if out.endswith(b"\r\n"):
                    break
        except TimeoutError:
            pass
        return out


def test_the_replies_lmcache_relies_on(resp_node) -> None:
    port = resp_node.resp_port
    value = bytes(range(256)) * 64  # 16 KiB, binary, CRLF inside
    assert resp_exchange(port, b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$%d\r\n" % len(value) + value + b"\r\n") == b"+OK\r\n"
    assert resp_exchange(port, b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n") == b"$%d\r\n" % len(value) + value + b"\r\n"
    assert resp_exchange(port, b"*2\r\n$3\r\nGET\r\n$7\r\nmissing\r\n") == b"$-1\r\n"
    assert resp_exchange(port, b"*2\r\n$6\r\nEXISTS\r\n$1\r\nk\r\n") == b":1\r\n"
    assert resp_exchange(port, b"*2\r\n$6\r\nEXISTS\r\n$7\r\nmissing\r\n") == b":0\r\n"


def async_contains(manager, backend: str, keys) -> int:
    """LMCache's async lookup path (the one its lookup server uses), run on the manager's loop.

    Not ``StorageManager.batched_contains``: for ``resp://`` that ends in the native client's
    ``batch_exists_sync``, which in LMCache 0.5.6 submits the request *before* registering the
    future its event-loop reader completes; a reply that arrives in between is dropped and
    the caller waits forever (seen here under load; the race does not depend on the server).
    The async path registers on the loop thread that drains completions, so it cannot race.
    """
    coro = manager.storage_backends[backend].batched_async_contains("memkv-test", keys)
    return asyncio.run_coroutine_threadsafe(coro, manager.loop).result(DEADLINE_S)


@pytest.mark.parametrize("scheme", ["redis", "resp"])
def test_lmcache_remote_url_connector(scheme, resp_node, managers) -> None:
    url = f"{scheme}://127.0.0.1:{resp_node.resp_port}"
    a = managers.make({"remote_url": url}, close_remote=False)
    remote = [name for name in a.storage_backends if name != "LocalCPUBackend"]
    assert len(remote) == 1, a.storage_backends
    keys = chunk_keys(7000, 3)
    objs, data = fill(a, 3, seed=3)
    a.batched_put(keys, objs)
    deadline = time.monotonic() + DEADLINE_S
    while async_contains(a, remote[0], keys) < 3:
        assert time.monotonic() < deadline, f"LMCache's {scheme}:// puts did not reach memkv"
        time.sleep(0.02)

    b = managers.make({"remote_url": url}, close_remote=False)  # a fresh engine: only memkv has the chunks
    assert async_contains(b, remote[0], chunk_keys(7000, 4)) == 3
    assert async_contains(b, remote[0], chunk_keys(9000, 2)) == 0
    got = b.batched_get(keys, location=remote[0])
    try:
        assert [bytes(g.byte_array) for g in got] == data
    finally:
        for g in got:
            g.ref_count_down()


def wait_task(query, task_id):
    deadline = time.monotonic() + DEADLINE_S
    while (result := query(task_id)) is None:
        assert time.monotonic() < deadline, "L2 adapter task did not complete"
        time.sleep(0.01)
    return result


def test_lmcache_resp_l2_adapter(resp_node, managers) -> None:
    local = managers.make({})  # LMCache memory objects to store from and load into
    adapter = create_l2_adapter_from_registry(RESPL2AdapterConfig("127.0.0.1", resp_node.resp_port, num_workers=2))
    try:
        keys = [ObjectKey(chunk_hash=bytes([i]) * 16, model_name="memkv-test/tiny-llama", kv_rank=0)
                for i in range(3)]
        objs, data = fill(local, 3, seed=5)
        task = adapter.submit_store_task(keys, objs)

        def stored(task_id):
            return adapter.pop_completed_store_tasks().get(task_id)

        assert wait_task(stored, task).is_successful()

        unknown = ObjectKey(chunk_hash=b"\xee" * 16, model_name="memkv-test/tiny-llama", kv_rank=0)
        found = wait_task(adapter.query_lookup_and_lock_result,
                          adapter.submit_lookup_and_lock_task(keys + [unknown], {}))
        assert [found.test(i) for i in range(4)] == [True, True, True, False]

        into, _ = fill(local, 3, seed=99)
        loaded = wait_task(adapter.query_load_result, adapter.submit_load_task(keys, into))
        assert [loaded.test(i) for i in range(3)] == [True] * 3
        assert [bytes(o.byte_array) for o in into] == data
        adapter.submit_unlock(keys)
    finally:
        adapter.close()
    assert CHUNK == objs[0].meta.shape[2]
