"""The terminal: one rich console and progress bars shared by the CLI and long-running stages."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

# Not a terminal (CI logs, pipes): wide enough that the summary table keeps one line per row.
console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)


def log(message: str) -> None:
    """A plain progress line (no markup: stage names are written in brackets), never wrapped: a long
    warning stays one line that a log search finds whole."""
    console.print(message, markup=False, soft_wrap=True)


def progress() -> Progress:
    """A progress bar with a description, a count and elapsed time (plain lines when not a TTY)."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[status]}"),
        console=console,
        transient=False,
    )
