import pytest
import torch

import openaff  # noqa: F401  (registers the models with timm)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
