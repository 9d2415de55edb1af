"""A folder that refuses new files, for the "can I write here?" tests."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest


def read_only_folder(tmp_path: Path) -> Path:
    """A folder that refuses new files to this process (for root: a sysfs folder; permission bits do not stop it)."""
    if os.geteuid() != 0:
        folder = tmp_path / "read-only"
        folder.mkdir()
        folder.chmod(0o555)
        return folder
    for folder in (Path("/sys/kernel"), Path("/sys")):
        try:
            fd, name = tempfile.mkstemp(dir=folder)
        except OSError:
            return folder
        os.close(fd)
        os.unlink(name)
    pytest.skip("running as root with no folder that refuses root's writes")
