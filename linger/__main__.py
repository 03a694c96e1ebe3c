"""Run the server: ``python -m linger``."""

from __future__ import annotations

from linger.cli import main

main()
