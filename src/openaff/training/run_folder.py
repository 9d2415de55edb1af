"""What a training run's folder holds, read back: ``config.yaml`` (the configuration used) and ``metrics.csv``.

``openaff train`` writes them (:mod:`.train`, :mod:`.history`); ``openaff study``, ``openaff cam --study`` and
``openaff segment rescore`` read them here.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from ..errors import DataError
from ..files import read_yaml_mapping

__all__ = ["CONFIG_FILE", "METRICS_FILE", "read_run_config", "read_run_metrics"]

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.csv"


def read_run_config(folder: str | Path) -> dict[str, Any]:
    """A run folder's ``config.yaml`` as a mapping (the :class:`~openaff.training.config.TrainConfig` fields).

    Raises:
        DataError: the file is missing, unreadable, or not a mapping.
    """
    path = Path(folder) / CONFIG_FILE
    data, why = read_yaml_mapping(path)
    if data is None:
        raise DataError(f"{path} is not a run configuration" if why == "not a mapping"
                        else f"cannot read {path}: {why}")
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
