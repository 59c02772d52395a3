"""atheris: coverage-guided binary-protocol inputs, parsed here and sent to a live node's port.

    python tests/fuzz/atheris_frames.py HOST PORT [libFuzzer flags] [CORPUS]

Coverage comes from the pure frame reader (memkv.protocol.codec, instrumented); every input is
also sent to the node as is, which must answer or close without a hang. tests/test_hardening.py
runs it for a fixed number of inputs and then checks the node's data and log.
"""

import sys

import atheris
from live_node import exchange  # tests/fuzz/live_node.py, next to this file

with atheris.instrument_imports():
    from memkv.protocol import codec

from memkv.errors import MemKVError

HOST, PORT = sys.argv[1], int(sys.argv[2])


def one(data: bytes) -> None:
    reader = codec.FrameReader()
    reader.feed(data)
    try:
        while not isinstance(reader.next_frame(), codec.NeedData):
            pass
    except MemKVError:
        pass
    exchange(HOST, PORT, data)


atheris.Setup(sys.argv[:1] + sys.argv[3:], one)
atheris.Fuzz()
