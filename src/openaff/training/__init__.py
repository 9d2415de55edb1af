"""Training and evaluation: ``openaff train`` / ``openaff eval`` and their Python API.

::

    from openaff.training.train import train
    from openaff.training.evaluate import evaluate

    result = train("fashion-mnist-cpu")            # a recipe name, a path, a mapping or a TrainConfig
    print(result.final["val_top1"], result.weights)
    print(evaluate(result.weights)["top1"])

Modules: ``config`` (recipes, flags), ``tasks`` (what a task is to the engine; classification),
``transforms`` (per-image), ``data`` (loaders for a config, from the building blocks of :mod:`openaff.data`),
``factory`` (model, optimiser, EMA, criterion), ``schedules``, ``engine`` (the loops), ``checkpoint`` and
``resume`` (resume state), ``distributed`` (torchrun, SyncBN), ``history`` (metrics.csv, curves.png), ``train``
and ``evaluate`` (the commands).
"""

from ..errors import CheckpointError, ConfigError, CorruptImageError, DataError, NonFiniteLossError, OpenAFFError
from .config import TrainConfig, load_recipe, make_config, recipe_names

__all__ = ["CheckpointError", "ConfigError", "CorruptImageError", "DataError", "NonFiniteLossError", "OpenAFFError",
           "TrainConfig", "load_recipe", "make_config", "recipe_names"]
