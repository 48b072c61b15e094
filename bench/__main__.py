"""``python -m bench [--only SECTION ...] [--quick]``: see ``bench/runner.py``."""

from __future__ import annotations

from bench.runner import main

if __name__ == "__main__":
    raise SystemExit(main())
