"""atheris: coverage-guided config files through memkv's loader.

    python tests/fuzz/atheris_config.py [libFuzzer flags] [CORPUS]

Any bytes as a TOML file: ``load_config`` returns a NodeConfig or raises a MemKVError;
anything else (a traceback in ``memkv serve --config``) is a crash.
"""

import os
import sys
import tempfile

import atheris

with atheris.instrument_imports():
    from memkv.config import load_config
    from memkv.errors import MemKVError

PATH = os.path.join(tempfile.mkdtemp(prefix="fuzz-config-"), "memkv.toml")


def one(data: bytes) -> None:
    with open(PATH, "wb") as f:
        f.write(data)
    try:
        load_config(PATH)
    except MemKVError:
        pass


atheris.Setup(sys.argv, one)
atheris.Fuzz()
