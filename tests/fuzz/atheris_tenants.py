"""atheris: coverage-guided tenants.json files through a node's tenant table.

    python tests/fuzz/atheris_tenants.py [libFuzzer flags] [CORPUS]

Any bytes as a standalone node's ``<data dir>/tenants.json``: ``TenantRegistry.load_file`` loads
it or raises an InvalidArgument naming the file; anything else (a traceback in ``memkv serve``)
is a crash, and so is an accepted tenant that is not well-formed.
"""

import math
import os
import sys
import tempfile

import atheris

with atheris.instrument_imports():
    from memkv.config import GRANT_LEVELS, TenantConfig
    from memkv.engine.store import Store
    from memkv.errors import InvalidArgument
    from memkv.server.tenants import TENANTS_FILE, TenantRegistry

DIR = tempfile.mkdtemp(prefix="fuzz-tenants-")
PATH = os.path.join(DIR, TENANTS_FILE)
STORE = Store(memory=1 << 20, shm_dir=DIR)
ROOT = {"root": TenantConfig("root", "root-token", {"*": "admin"})}


def one(data: bytes) -> None:
    with open(PATH, "wb") as f:
        f.write(data)
    reg = TenantRegistry(ROOT, STORE, data_dir=DIR)
    try:
        reg.load_file()
    except InvalidArgument as exc:
        assert TENANTS_FILE in exc.message, exc.message
        return
    for t in reg.tenants.values():
        assert isinstance(t.token, str) and t.token
        assert all(isinstance(k, str) and v in GRANT_LEVELS for k, v in t.grants.items())
        assert t.quota is None or (isinstance(t.quota, int) and t.quota >= 0)
        assert all(v is None or 0 < v < math.inf for v in (t.rate, t.burst))
        assert isinstance(t.no_store, bool)


atheris.Setup(sys.argv, one)
atheris.Fuzz()
