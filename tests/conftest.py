from pathlib import Path

import pytest
import torch

import openaff  # noqa: F401  (registers the models with timm)

PROJECT = Path(__file__).resolve().parents[1]
SHARED = PROJECT.parent / "shared"
MXNET_FIXTURES = SHARED / "fixtures" / "mxnet"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
