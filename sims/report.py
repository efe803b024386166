"""How every benchmark reports: a rich table for people, one JSON line for
machines (the last line of output), with peak memory always included."""

from __future__ import annotations

import json
import resource
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table


def peak_rss_bytes(*, children: bool = True) -> int:
    """Peak resident set size of this process and (unless ``children`` is
    false) of its largest waited-for child."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss if children else 0
    scale = 1 if sys.platform == "darwin" else 1024  # Linux reports KiB
    return max(own, child) * scale


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """The human half of a report; the JSON line follows it on stdout."""
    table = Table(title=title)
    for column in columns:
        table.add_column(column, justify="right" if column != columns[0] else "left")
    for row in rows:
        table.add_row(*(_fmt(cell) for cell in row))
    console = Console()
    if not console.is_terminal:
        console = Console(width=160)  # a log file should not truncate columns
    console.print(table)


def progress() -> Progress:
    """A progress bar on stderr for long benchmarks and experiments."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
    )


def emit_json(benchmark: str, figures: Mapping[str, Any]) -> dict[str, Any]:
    """Print the one JSON line of a benchmark (with peak RSS) and return it."""
    line = {"benchmark": benchmark, **figures, "peak_rss_bytes": peak_rss_bytes()}
    print(json.dumps(line, sort_keys=False), flush=True)
    return line


def _fmt(cell: Any) -> str:
    if isinstance(cell, bool):
        return "yes" if cell else "no"
    if isinstance(cell, float):
        return f"{cell:,.3f}" if abs(cell) < 100 else f"{cell:,.0f}"
    if isinstance(cell, int):
        return f"{cell:,}"
    return str(cell)
