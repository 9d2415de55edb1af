"""What a training run's folder holds, read back: ``config.yaml`` (the configuration used) and ``metrics.csv``.

``openaff train`` writes them (:mod:`.train`, :mod:`.history`); ``openaff study``, ``openaff cam --study`` and
``openaff segment rescore`` read them here.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import yaml

from ..errors import DataError

__all__ = ["CONFIG_FILE", "METRICS_FILE", "read_run_config", "read_run_metrics"]

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.csv"


def read_run_config(folder: str | Path) -> dict[str, Any]:
    """A run folder's ``config.yaml`` as a mapping (the :class:`~openaff.training.config.TrainConfig` fields).

    Raises:
        DataError: the file is missing, unreadable, or not a mapping.
    """
    path = Path(folder) / CONFIG_FILE
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise DataError(f"cannot read {path}: {' '.join(str(err).split())}") from None
    if not isinstance(data, dict):
        raise DataError(f"{path} is not a run configuration")
    return data


def _value(key: str, text: str | None) -> Any:
    if text in (None, ""):
        return None
    try:
        return int(text) if key == "epoch" else float(text)
    except ValueError:
        return text


def read_run_metrics(folder: str | Path) -> list[dict[str, Any]]:
    """A run folder's ``metrics.csv``, one row per epoch: ``epoch`` an int, numbers floats, empty cells None.

    A folder without the file (a run that has not finished an epoch) gives no rows.

    Raises:
        DataError: the file cannot be read.
    """
    path = Path(folder) / METRICS_FILE
    if not path.is_file():
        return []
    try:
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, csv.Error, UnicodeDecodeError) as err:
        raise DataError(f"cannot read {path}: {err}") from None
    return [{k: _value(k, v) for k, v in r.items()} for r in rows]
