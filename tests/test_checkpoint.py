"""Weight and checkpoint files: the mode of what is written, and one clear line for what cannot be read."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from openaff.errors import CheckpointError
from openaff.files import atomic_write, load_weights, save_weights
from openaff.mxnet.ndarray import save_ndarray_list
from openaff.training.checkpoint import load_checkpoint, save_checkpoint


@pytest.fixture
def umask():
    """Set the process umask for one test and restore it afterwards."""
    old = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_written_files_get_the_umask_mode(tmp_path: Path, umask, mask: int) -> None:
    umask(mask)
    atomic_write(tmp_path / "a.bin", lambda f: f.write(b"x"))
    save_weights(tmp_path / "w.safetensors", {"w": torch.zeros(2)}, {"model": "m"})
    save_checkpoint(tmp_path / "last.pt", {"epoch": 1})
    with open(tmp_path / "plain.txt", "w"):  # what a plain open() gives
        pass
    expected = 0o666 & ~mask
    assert _mode(tmp_path / "plain.txt") == expected
    for name in ("a.bin", "w.safetensors", "last.pt"):
        assert _mode(tmp_path / name) == expected, name
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_rewriting_a_file_keeps_its_mode(tmp_path: Path, umask) -> None:
    path = tmp_path / "best.safetensors"
    atomic_write(path, lambda f: f.write(b"old"))
    path.chmod(0o640)
    atomic_write(path, lambda f: f.write(b"new"))
    assert path.read_bytes() == b"new" and _mode(path) == 0o640


def _one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg, msg
    assert "weights_only=False" not in msg and "weights_only" not in msg, msg  # never suggest the unsafe load
    return msg


@pytest.mark.parametrize("loader", [load_weights, load_checkpoint])
def test_unreadable_files_say_what_they_are(tmp_path: Path, loader) -> None:
    empty = tmp_path / "last.pt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError) as err:
        loader(empty)
    assert "is empty" in _one_line(err)

    junk = tmp_path / "junk.pt"
    junk.write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError) as err:
        loader(junk)
    assert "not a PyTorch checkpoint" in _one_line(err)

    good = tmp_path / "good.pt"
    torch.save({"w": torch.arange(1000.0)}, good)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError) as err:
        loader(cut)
    assert "damaged or truncated" in _one_line(err)

    params = tmp_path / "model.params"
    save_ndarray_list(params, {"arg:conv.weight": np.zeros((2, 3), np.float32)})
    for name in ("model.params", "renamed.pt"):  # recognised by its bytes, not its name
        params = params.rename(tmp_path / name)
        with pytest.raises(CheckpointError) as err:
            loader(params)
        assert "MXNet" in _one_line(err) and "openaff convert" in str(err.value)

    with pytest.raises(CheckpointError) as err:
        loader(tmp_path)
    assert "is a directory" in _one_line(err)
    with pytest.raises(CheckpointError) as err:
        loader(tmp_path / "nope.pt")
    assert "does not exist" in _one_line(err)


def test_pickled_objects_are_refused_not_run(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    torch.save({"state_dict": {"w": torch.zeros(1)}, "x": Evil()}, tmp_path / "evil.pt")
    for loader in (load_weights, load_checkpoint):
        with pytest.raises(CheckpointError) as err:
            loader(tmp_path / "evil.pt")
        msg = _one_line(err)
        assert "system" in msg and "refused" in msg, msg
    assert not marker.exists()


def test_safetensors_named_pt_and_good_files_load(tmp_path: Path) -> None:
    save_weights(tmp_path / "w.pt", {"a.weight": torch.ones(2)}, {"model": "m", "model_kwargs": {"b": 1}})
    sd, meta = load_weights(tmp_path / "w.pt")
    assert torch.equal(sd["a.weight"], torch.ones(2)) and meta["model_kwargs"] == {"b": 1}
    save_checkpoint(tmp_path / "last.pt", {"model": {"a.weight": torch.ones(2)}, "epoch": 3,
                                           "config": {"model": "m", "model_kwargs": {}, "data": "cifar10",
                                                      "data_dir": "/d", "img_size": None}})
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 3
    sd, meta = load_weights(tmp_path / "last.pt")
    assert list(sd) == ["a.weight"] and (meta["model"], meta["data"], meta["data_dir"]) == ("m", "cifar10", "/d")
