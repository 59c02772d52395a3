"""atheris: coverage-guided RESP inputs, parsed here and sent to a live node's RESP port.

    python tests/fuzz/atheris_resp.py HOST PORT [libFuzzer flags] [CORPUS]

Coverage comes from the pure command reader (memkv.protocol.resp, instrumented); every input is
also sent to the node as is, and what comes back must parse as RESP replies, contain no
"internal error" (a handler raised something it did not mean to), and arrive without a hang.
"""

import sys

import atheris
from live_node import exchange  # tests/fuzz/live_node.py, next to this file

with atheris.instrument_imports():
    from memkv.protocol import resp as R

HOST, PORT = sys.argv[1], int(sys.argv[2])


def one(data: bytes) -> None:
    reader = R.CommandReader()
    try:
        reader.feed(data)
        while True:
            item = reader.next()
            if isinstance(item, R.NeedData):
                break
            if isinstance(item, R.LargeArg):
                break  # streamed into the node's region; the parser's part ends here
    except R.RespError:
        pass
    buf = exchange(HOST, PORT, data)
    pos = 0
    while pos < len(buf):
        r = R.parse_reply(buf, pos)
        if r is None:
            break  # cut by the close after a protocol error
        if isinstance(r[0], R.ReplyError) and "internal error" in r[0].message:
            raise RuntimeError(f"internal error for {data[:80]!r}: {r[0].message}")
        pos = r[1]


atheris.Setup(sys.argv[:1] + sys.argv[3:], one)
atheris.Fuzz()
