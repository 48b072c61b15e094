"""Render the fault suite's figures (build/faults/*.json) as the table in docs/RELIABILITY.md.

.venv/bin/python -m tests.faults.report      # after `.venv/bin/pytest -m faults`
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.faults.harness import FIGURES_DIR


def _cell(window: dict[str, Any]) -> str:
    if not window.get("requests"):
        return "-"
    sources = ", ".join(f"{k} {v}" for k, v in sorted(window["sources"].items()))
    errors = f"{window['errors']} err ({100 * window['error_rate']:.1f}%)"
    return f"{window['requests']} req, {errors}, p99 {window['p99_ms']} ms; {sources}"


def render(figures: list[dict[str, Any]]) -> str:
    lines = ["| fault | load held | during the fault | measured | lost | reproduce |", "|---|---|---|---|---|---|"]
    for fig in sorted(figures, key=lambda f: f["name"]):
        during = "<br>".join(f"**{label}**: {_cell(w)}" for label, w in fig["windows"].items())
        facts = "<br>".join(f"{k}: {v}" for k, v in fig["facts"].items())
        lines.append(f"| {fig['fault']} | {fig['load']} | {during} | {facts} | {fig['lost']} | `{fig['command']}` |")
    return "\n".join(lines)


def load_figures(folder: Path = FIGURES_DIR) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]


def main() -> None:
    print(render(load_figures()))


if __name__ == "__main__":
    main()
