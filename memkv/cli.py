"""The ``memkv`` command's entry point (console script, ``python -m memkv.cli``).

The commands themselves live in the command-line layer, memkv/tools/cli.py; this
module only keeps the entry point that scripts, deployments and tests start.
"""

from __future__ import annotations

import sys

from memkv.tools.cli import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
