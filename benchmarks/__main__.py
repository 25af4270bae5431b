"""``python -m benchmarks``: see benchmarks/cli.py (``python -m benchmarks --help``)."""

from .cli import main

raise SystemExit(main())
