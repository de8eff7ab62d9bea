"""Writes a benchmark's figures: ``<out>/<name>_<date>.json`` (everything measured) and
``.md`` (the table for the README)."""

from __future__ import annotations

import json
import os


def write_results(out_dir: str, name: str, result: dict, lines: list[str]) -> str:
    """Writes both files; returns their common path stem."""
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, f"{name}_{result['date']}")
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=2)
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    return stem
