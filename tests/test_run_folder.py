"""openaff.training.run_folder: a run folder's config.yaml and metrics.csv read back as they were written."""

from __future__ import annotations

from pathlib import Path

import pytest

from openaff.errors import DataError
from openaff.training import make_config
from openaff.training.config import to_yaml
from openaff.training.history import COLUMNS, write_csv
from openaff.training.run_folder import read_run_config, read_run_metrics


def test_what_training_writes_reads_back(tmp_path: Path) -> None:
    cfg = make_config(model_kwargs=dict(width_mult=0.25), epochs=3, seed=4)
    (tmp_path / "config.yaml").write_text(to_yaml(cfg))
    back = read_run_config(tmp_path)
    assert back["model"] == cfg.model and back["model_kwargs"] == {"width_mult": 0.25} and back["seed"] == 4
    assert read_run_metrics(tmp_path) == []  # no epoch finished yet
    rows = [dict(epoch=0, lr_mean=0.1, train_loss=2.0, val_loss=1.5, val_top1=40.0, val_top5=90.0, img_per_s=10.0,
                 seconds=1.25, ema_val_top1=41.0), dict(epoch=1, lr_mean=0.05, train_loss=1.0, val_loss=1.0,
                                                       val_top1=50.0, val_top5=95.0, img_per_s=11.0, seconds=1.5)]
    write_csv(rows, tmp_path / "metrics.csv", COLUMNS)
    got = read_run_metrics(tmp_path)
    assert [r["epoch"] for r in got] == [0, 1] and isinstance(got[0]["epoch"], int)
    assert got[1]["val_top1"] == 50.0 and got[0]["seconds"] == 1.25
    assert got[0]["ema_val_top1"] == 41.0 and got[1]["ema_val_top1"] is None  # an empty cell


def test_unreadable_run_files_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"cannot read \S*config.yaml"):
        read_run_config(tmp_path)
    (tmp_path / "config.yaml").write_text("- a list, not a mapping\n")
    with pytest.raises(DataError, match=r"config.yaml is not a run configuration"):
        read_run_config(tmp_path)
    (tmp_path / "config.yaml").write_text("model: [unclosed\n")
    with pytest.raises(DataError, match=r"cannot read \S*config.yaml: ") as err:
        read_run_config(tmp_path)
    assert "\n" not in str(err.value)
    (tmp_path / "metrics.csv").write_bytes(b"epoch,val_top1\n0,\xff\xfe\n")
    with pytest.raises(DataError, match=r"cannot read \S*metrics.csv"):
        read_run_metrics(tmp_path)
