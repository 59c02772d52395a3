"""Side-by-side benchmarks of memkv and its peers (``python -m bench.run``)."""
