"""Where a benchmark's results go: ``<name>.json`` (everything measured, for scripts and later
reports) and ``<name>.md`` (the table a person reads, which README and docs cite), side by side."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable


def save_report(out: Path, name: str, report: dict, write_markdown: Callable[[dict, Path], None]) -> Path:
    """Write ``out/<name>.json`` and ``out/<name>.md`` (``out`` created if missing), print the
    markdown, and return its path."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(report, indent=1))
    markdown = out / f"{name}.md"
    write_markdown(report, markdown)
    print(markdown.read_text())
    return markdown
