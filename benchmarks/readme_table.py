"""Publish a benchmark's results: the JSON file, the table on stdout, the README section."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def publish(results: dict, json_path: str | Path, table: str, readme: str | None, section: str) -> Path:
    """Write `results` to `json_path`, print `table`, and put it in `readme` (if given)."""
    json_path = Path(json_path)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(results, indent=2, ensure_ascii=False))
    print(table)
    if readme:
        update_readme(Path(readme), table, section)
    return json_path


def update_readme(path: Path, markdown: str, section: str) -> bool:
    """Replace the text between `<!-- section:start -->` and `<!-- section:end -->`;
    warn (and change nothing) without them."""
    readme_start, readme_end = f"<!-- {section}:start -->", f"<!-- {section}:end -->"
    if not path.is_file():
        print(f"warning: {path} not found; README not updated", file=sys.stderr)
        return False
    text = path.read_text()
    start = text.find(readme_start)
    end = text.find(readme_end, start + len(readme_start)) if start >= 0 else -1
    if start < 0 or end < 0:
        print(f"warning: {path} lacks the markers {readme_start} ... {readme_end}; README not updated", file=sys.stderr)
        return False
    path.write_text(f"{text[: start + len(readme_start)]}\n{markdown.strip()}\n{text[end:]}")
    print(f"updated {path}")
    return True
