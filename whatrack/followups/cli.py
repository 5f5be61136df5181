"""``whatrack worker`` and ``whatrack followup ...``; ``python -m whatrack.followups.cli`` runs the worker alone."""

from __future__ import annotations

from whatrack.followups.worker import cli_main

if __name__ == "__main__":
    raise SystemExit(cli_main())
