"""Prefix-aware routing for inference replicas in front of memkv.

- :class:`PrefixIndex` (``index``): per replica, leading prompt tokens in its
  GPU cache and leading tokens loadable from memkv (with the holding nodes and
  whether one shares the replica's host);
- :class:`EventFeeds` (``zmq_feed``): follows vLLM's KV-event streams of the
  replicas and of memkv nodes into the index (replay on gaps, clear on loss);
- :class:`BlockHasher` (``vllm_hash``): vLLM's block hashes from token ids;
- policies (``policy``): which replica gets a request;
- ``front``: the ``memkv route`` OpenAI-compatible HTTP router.
"""

from memkv.client.router.feed import FeedState
from memkv.client.router.index import PrefixAnswer, PrefixIndex, Replica, ReplicaAnswer, StoreNode
from memkv.client.router.policy import LongestPrefixThenLoad, RoundRobin, ScoringPolicy
from memkv.client.router.vllm_hash import BlockHasher
from memkv.client.router.zmq_feed import EventFeeds, FeedSpec

__all__ = [
    "BlockHasher", "EventFeeds", "FeedSpec", "FeedState", "LongestPrefixThenLoad", "PrefixAnswer",
    "PrefixIndex", "Replica", "ReplicaAnswer", "RoundRobin", "ScoringPolicy", "StoreNode",
]
