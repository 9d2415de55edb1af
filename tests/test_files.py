"""openaff.files: the umask read without setting it, and the "can I write here?" checks (a real write, root too)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from _file_utils import read_only_folder

from openaff.errors import ConfigError
from openaff.files import check_output_file, check_output_folder, current_umask


@pytest.fixture
def umask():
    """Set the process umask for one test and restore it afterwards."""
    old = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(old)


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o077])
def test_current_umask_reads_it_without_setting_it(umask, mask: int, monkeypatch: pytest.MonkeyPatch) -> None:
    umask(mask)
    if Path("/proc/self/status").is_file():
        # Setting the umask to read it races other threads creating files; with /proc it is never set.
        def no_set(_: int) -> int:
            raise AssertionError("os.umask was called")

        monkeypatch.setattr(os, "umask", no_set)
    assert current_umask() == mask


def _refused(path: Path, flag: str = "--json", **kwargs) -> str:
    with pytest.raises(ConfigError) as err:
        check_output_file(path, flag, **kwargs)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith((f"{flag} ", f"cannot write {flag} ")), msg
    return msg


def test_output_file_checks_say_what_is_wrong(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("a file, not a folder")
    assert _refused(tmp_path, example="r.json") == f"--json {tmp_path} is a directory; give a file name, e.g. " \
                                                  f"{tmp_path / 'r.json'}"
    assert _refused(tmp_path, "-o").endswith("is a directory; give a file name")
    assert _refused(tmp_path / "no" / "r.json").endswith(f"folder {tmp_path / 'no'} does not exist")
    assert _refused(tmp_path / "file" / "r.json").endswith(f"{tmp_path / 'file'} is not a folder")
    # A folder the command would create: the first one that exists must take files, and is not a file.
    assert _refused(tmp_path / "file" / "a" / "r.json", make_parents=True).endswith("is not a folder")
    check_output_file(tmp_path / "a" / "b" / "r.json", "--json", make_parents=True)
    assert not (tmp_path / "a").exists()  # checked, not created
    (tmp_path / "old.json").write_text("kept")
    check_output_file(tmp_path / "old.json", "--json")
    assert (tmp_path / "old.json").read_text() == "kept"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "old.json"]  # no probe file left


def test_output_checks_write_for_real(tmp_path: Path) -> None:
    folder = read_only_folder(tmp_path)
    assert f"cannot create files in {folder} (" in _refused(folder / "r.json")
    with pytest.raises(ConfigError, match=f"cannot write to the output folder {folder / 'run'}: "):
        check_output_folder(folder / "run")
    with pytest.raises(ConfigError, match=f"cannot write to the study folder {folder}: "):
        check_output_folder(folder, "the study folder")


def test_output_folder_is_created(tmp_path: Path) -> None:
    check_output_folder(tmp_path / "a" / "b")
    assert (tmp_path / "a" / "b").is_dir() and not any((tmp_path / "a" / "b").iterdir())
