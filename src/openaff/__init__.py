"""open-aff: Attentional Feature Fusion (Dai et al., WACV 2021) in PyTorch.

Importing the package registers its models with timm::

    import openaff, timm
    model = timm.create_model("aff_resnet50")
"""

from . import models
from .layers import AFF, IAFF, MSCAM, create_fusion, fusion_names, register_fusion

__version__ = "0.1.0"

__all__ = ["AFF", "IAFF", "MSCAM", "create_fusion", "fusion_names", "models", "register_fusion"]
