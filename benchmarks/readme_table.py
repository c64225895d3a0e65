"""Publish a benchmark's results: the JSON file, the table on stdout, the README section.

Where results go: a full run writes benchmarks/results/NAME.json (committed: the README's
tables and plots come from there); a `--quick` run writes benchmarks/results/quick/NAME.json
(git-ignored), so checking that a benchmark runs never overwrites a committed result; `--json
PATH` writes PATH. A plot goes beside its JSON file, with the suffix .png.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
QUICK_RESULTS_DIR = RESULTS_DIR / "quick"


def results_path(name: str, quick: bool, given: str | None = None) -> Path:
    """The JSON file of a run: `given` (--json) if any, else NAME.json in the folder for its kind of run."""
    if given:
        return Path(given)
    return (QUICK_RESULTS_DIR if quick else RESULTS_DIR) / f"{name}.json"


def plot_path(json_path: str | Path) -> Path:
    """A run's plot: beside its JSON file, with the suffix .png."""
    return Path(json_path).with_suffix(".png")


def command_line(module: str) -> str:
    """How this run was started, as README footers show it (`python -m benchmarks.NAME ...`)."""
    return " ".join(["python", "-m", module, *sys.argv[1:]])


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
