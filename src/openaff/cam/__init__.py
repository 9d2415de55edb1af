"""Where the networks look: Grad-CAM grids (the paper's Figure 6), MS-CAM attention maps, a localisation score.

Modules: ``models`` (:class:`CamModel`, :func:`load_model`, :func:`default_target_layer`, :class:`CamError`),
``images`` (:class:`Sample`, :func:`load_images`, :func:`photo_samples`, :func:`scene_samples`, the
preprocessing), ``gradcam`` (:func:`compute_cams`, :func:`gradcam_grid`, the figure helpers),
``localisation`` (:func:`localisation_score`, :func:`score_models`), ``study`` (:func:`score_study` of an
``openaff study`` folder), ``attention`` (:func:`attention_maps`), ``cli`` (``openaff cam`` and
``openaff attention``; its docstring is the commands' full description).
"""

from .attention import AttentionMap, AttentionResult, attention_maps
from .cli import add_parser
from .gradcam import METHODS, CamGrid, compute_cams, gradcam_grid
from .images import IMAGE_SUFFIXES, PHOTOS, Sample, load_images, photo_samples, scene_samples
from .images import _preprocess as _preprocess
from .localisation import Localisation, localisation_score, score_models
from .models import CamError, CamModel, default_target_layer, load_model
from .study import StudyScore, score_study
from .study import study_markdown as study_markdown

__all__ = ["IMAGE_SUFFIXES", "METHODS", "PHOTOS", "AttentionMap", "AttentionResult", "CamError", "CamGrid",
           "CamModel", "Localisation", "Sample", "StudyScore", "add_parser", "attention_maps", "compute_cams",
           "default_target_layer", "gradcam_grid", "load_images", "load_model", "localisation_score",
           "photo_samples", "scene_samples", "score_models", "score_study"]
