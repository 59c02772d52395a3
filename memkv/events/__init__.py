"""KV-cache events in vLLM's wire format, published by a storage node.

``wire`` is the pure part (the event structs, frames, the replay protocol's
bytes), ``stream`` the per-topic sequence numbers and replay buffer (pure),
``publisher`` the ZMQ sockets and the thread that drives them. Routers decode
what this package publishes with vLLM's own classes.
"""
