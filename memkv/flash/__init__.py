"""The flash tier of a node: durable namespaces on append-only, checksummed segment files."""
