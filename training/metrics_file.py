"""Reading and repairing `<run.dir>/metrics.jsonl` without torch (plots and reports read it too).

A run killed mid-append (or a full disk) can leave a torn last line: `read_metrics` and `truncate_after`
drop it, and a resumed run rewrites the file cleanly (atomically) before appending, so the torn text
never ends up in the middle. A line in the middle that is not a JSON object is not what the writer
(training/tracking.py) leaves behind (two writers, damage, another file): that is a MetricsError naming
the line, not dropped.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from selfflow.data.atomic import write_atomic


class MetricsError(ValueError):
    """A metrics.jsonl line before the last one is not a JSON object."""


def _parse(path: Path) -> tuple[list[dict[str, Any]], bool]:
    """(rows, whether the file needs a rewrite before more rows are appended: a torn last line was
    dropped, or the last row lacks its newline)."""
    text = path.read_text(encoding="utf-8", errors="replace")  # a torn line may end mid-character
    lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    rows = []
    for i, (n, line) in enumerate(lines):
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if not isinstance(row, dict):
            if i == len(lines) - 1:  # killed mid-append or disk full: the row was never complete
                return rows, True
            raise MetricsError(f"{path} line {n} is not a JSON row; only a torn last line is dropped")
        rows.append(row)
    return rows, bool(text) and not text.endswith("\n")


def truncate_after(path: Path, step: int) -> None:
    """Drop lines logged after `step` (a run resumed from an older checkpoint rewrites them) and a torn
    last line; the file is replaced atomically, and only when something changes."""
    if not path.is_file():
        return
    rows, torn = _parse(path)
    kept = [row for row in rows if row.get("step", 0) <= step]
    if torn or len(kept) != len(rows):
        write_atomic(path, "".join(json.dumps(row) + "\n" for row in kept), durable=True)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All logged rows of a metrics.jsonl, in order, less a torn last line."""
    return _parse(Path(path))[0]
