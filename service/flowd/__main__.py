"""``python -m flowd`` is the ``flowd`` command."""

from __future__ import annotations

from flowd.cli.flowd import main

raise SystemExit(main())
