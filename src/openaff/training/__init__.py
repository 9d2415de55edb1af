"""Training and evaluation: ``openaff train`` / ``openaff eval`` and their Python API.

::

    from openaff.training.train import train
    from openaff.training.evaluate import evaluate

    result = train("fashion-mnist-cpu")            # a recipe name, a path, a mapping or a TrainConfig
    print(result.final["val_top1"], result.weights)
    print(evaluate(result.weights)["top1"])

Modules: ``config`` (recipes, flags), ``datasets`` (readers), ``data`` (transforms, loaders for a
config), ``loader`` (samplers, on-device batch pipeline), ``engine`` (the loops), ``checkpoint``
(resume state), ``distributed`` (torchrun, SyncBN), ``metrics`` (CSV, plot). The errors are
:mod:`openaff.errors`' (re-exported here), atomic files and weight files :mod:`openaff.files`'.
"""

from ..errors import CheckpointError, ConfigError, CorruptImageError, DataError, NonFiniteLossError, OpenAFFError
from .config import TrainConfig, load_recipe, make_config, recipe_names

__all__ = ["CheckpointError", "ConfigError", "CorruptImageError", "DataError", "NonFiniteLossError", "OpenAFFError",
           "TrainConfig", "load_recipe", "make_config", "recipe_names"]
