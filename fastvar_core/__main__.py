"""python -m fastvar_core <command>: see cli.py."""

from .cli import main

raise SystemExit(main())
