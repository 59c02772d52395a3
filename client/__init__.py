"""memkv client library: ``Client`` (trio) and ``SyncClient`` (blocking)."""

from memkv.client.client import Client
from memkv.client.sync_client import SyncClient

__all__ = ["Client", "SyncClient"]
