"""``python -m resilient_db.chaos run ...``: the same as ``resilient-db chaos run ...``."""

from __future__ import annotations

import sys

from resilient_db.chaos.cli import main

if __name__ == "__main__":
    sys.exit(main(["chaos", *sys.argv[1:]]))
