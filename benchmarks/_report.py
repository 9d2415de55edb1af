"""What every benchmark script here records: the command, date, machine, torch and commit, and its JSON + table."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path


def run_meta(script: str, argv: list[str] | None, threads: int, **extra: object) -> dict:
    """The facts of this run: ``command`` (as typed, from the repository root), ``date``, ``machine``, ``torch``,
    ``commit`` (when in a git checkout), and ``extra``."""
    import torch

    from openaff.machine import cpu_name

    command = f"python benchmarks/{script} " + " ".join(argv if argv is not None else sys.argv[1:])
    meta = {"command": command.strip(), "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": f"{cpu_name() or platform.machine()}, {threads} threads", "torch": torch.__version__}
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parent).stdout.strip()
    except OSError:
        commit = ""
    if commit:
        meta["commit"] = commit
    return {**meta, **extra}


def write_report(out: Path, stem: str, meta: dict, rows: list[dict], lines: list[str]) -> None:
    """``out/stem.json`` (``meta`` and ``rows``) and ``out/stem.md`` (``lines``), and the table on stdout."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps({**meta, "rows": rows}, indent=1) + "\n")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
