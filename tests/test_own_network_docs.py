"""Every ```python block of docs/own-network.md runs exactly as printed, each in a fresh namespace, and what it
prints is what its comments say: ``print(x)  # shown`` (the printed line begins the comment) and ``print(err)``
followed by comment lines (the message, its lines joined by spaces)."""

import contextlib
import io
import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "own-network.md"


def _blocks() -> list[tuple[str, str]]:
    """``(section heading + index, code)`` of every python block, in order."""
    text = DOC.read_text()
    blocks, heading, count = [], "top", {}
    for m in re.finditer(r"^## ([^\n]+)$|^```python\n(.*?)^```", text, re.M | re.S):
        if m.group(1):
            heading = m.group(1).strip()
        else:
            count[heading] = count.get(heading, 0) + 1
            blocks.append((f"{heading} #{count[heading]}", m.group(2)))
    return blocks


def _expected(code: str) -> list[tuple[str, bool]]:
    """What the block's comments say it prints: ``(text, exact)`` per print, in order."""
    lines = code.splitlines()
    out = []
    for i, line in enumerate(lines):
        if not line.lstrip().startswith("print("):
            continue
        if "#" in line and line.index("#") > line.index("print("):
            out.append((line.split("#", 1)[1].strip(), False))
        else:
            following = []
            for nxt in lines[i + 1:]:
                if not nxt.lstrip().startswith("#"):
                    break
                following.append(nxt.strip().lstrip("#").strip())
            if following:
                out.append((" ".join(following), True))
    return out


BLOCKS = _blocks()


def test_the_page_has_every_example_of_the_issue():
    headings = {name.rsplit(" #", 1)[0] for name, _ in BLOCKS}
    for section in ("Maps of different channels and sizes", "Three (or more) inputs", "1-D: audio and sequences",
                    "3-D: volumes", "MS-CAM as an SE-style attention in timm", "SyncBN and multi-process training"):
        assert section in headings, section
    assert "\n## Backbones and necks\n" in DOC.read_text()
    assert sum(len(_expected(code)) for _, code in BLOCKS[:8]) >= 15  # the outputs shown are checked


@pytest.mark.parametrize("name, code", BLOCKS, ids=[name for name, _ in BLOCKS])
def test_block_runs_as_printed(name, code):
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        exec(compile(code, f"{DOC.name}: {name}", "exec"), {"__name__": "__main__"})
    printed = stdout.getvalue().splitlines()
    expected = _expected(code)
    if not expected:
        return
    # One printed line per print of a checked value (the examples print one line each).
    assert len(printed) >= len(expected), printed
    for got, (want, exact) in zip(printed, expected, strict=False):
        if exact:
            assert got == want, (got, want)
        else:
            assert want.startswith(got), (got, want)
