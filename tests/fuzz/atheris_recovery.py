"""atheris: coverage-guided damage to a real segment file, then recovery of the index.

    python tests/fuzz/atheris_recovery.py SEGMENT [libFuzzer flags] [CORPUS]

SEGMENT is a segment file a real node wrote. Each input is a list of edits (offset, bytes)
applied to a copy of it; ``memkv.flash.recovery.recover`` then rebuilds the index from the copy.
It must not raise, and every value it indexes must check out against its record's checksum
(recovery never indexes damaged bytes); every record of the pristine file whose bytes the
edits left alone must be indexed, unless a newer record of its key was.
"""

import os
import sys
import tempfile

import atheris

with atheris.instrument_imports():
    from memkv.flash import record as rec
    from memkv.flash.recovery import recover
    from memkv.flash.segment import Segment

import xxhash

SOURCE = sys.argv[1]
PRISTINE = open(SOURCE, "rb").read()
RECORDS = [r for r in rec.scan(PRISTINE) if isinstance(r, rec.Record)]
WORK = tempfile.mkdtemp(prefix="fuzz-recovery-")
NAME = os.path.basename(SOURCE)
SEG_ID = int(NAME[4:12])


def one(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    buf = bytearray(PRISTINE)
    for _ in range(fdp.ConsumeIntInRange(1, 6)):
        off = fdp.ConsumeIntInRange(0, max(0, len(buf) - 1))
        what = fdp.ConsumeIntInRange(0, 3)
        if what == 0:
            chunk = fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 64))
            buf[off:off + len(chunk)] = chunk
        elif what == 1:
            del buf[off:]  # cut the file
        elif what == 2:
            buf += fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 512))
        else:
            n = fdp.ConsumeIntInRange(1, 4096)
            buf[off:off + n] = bytes(min(n, max(0, len(buf) - off)))
    for f in os.listdir(WORK):
        os.unlink(os.path.join(WORK, f))
    path = os.path.join(WORK, NAME)
    with open(path, "wb") as f:
        f.write(buf)
    seg = Segment(WORK, SEG_ID, create=False)
    try:
        out = recover(WORK, {SEG_ID: seg}, lambda ns, tenant: "")
    finally:
        seg.close()
    cols = out.cols
    keys = cols.get("keys") or []
    lsn_of = {}
    for i, key in enumerate(keys):
        voff, size, cs = cols["voffs"][i], cols["lengths"][i], cols["checksums"][i]
        if xxhash.xxh3_64_intdigest(bytes(buf[voff:voff + size])) != cs:
            raise RuntimeError(f"recovery indexed damaged bytes of {bytes(key)!r}")
        lsn_of[bytes(key)] = cols["lsns"][i]
    newest = {}
    for r in RECORDS:
        if r.key not in newest or r.lsn > newest[r.key].lsn:
            newest[r.key] = r
    for key, r in newest.items():
        if r.kind != rec.PUT or r.end > len(buf) or bytes(buf[r.offset:r.end]) != PRISTINE[r.offset:r.end]:
            continue
        if lsn_of.get(key, -1) < r.lsn:
            raise RuntimeError(f"intact newest record of {key!r} (lsn {r.lsn}) not recovered")


atheris.Setup(sys.argv[:1] + sys.argv[2:], one)
atheris.Fuzz()
