"""Terminal output helpers: progress and logs go to stderr, so stdout carries only results."""

from __future__ import annotations

import logging
import sys


def stderr_console():
    from rich.console import Console

    return Console(file=sys.stderr, stderr=True)


def configure_logging(verbose: bool = False) -> None:
    """Called by the CLI only (library code never configures logging)."""
    from rich.logging import RichHandler

    handler = RichHandler(console=stderr_console(), show_time=False, show_path=False)
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, handlers=[handler], format="%(message)s"
    )
    logging.getLogger("dgemma").setLevel(logging.INFO if verbose else logging.WARNING)
