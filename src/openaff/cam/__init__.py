"""Where the networks look: Grad-CAM grids (the paper's Figure 6), MS-CAM attention maps, CAM scores beside baselines.

Modules: ``models`` (:class:`CamModel`, :func:`load_model`, :func:`default_target_layer`, :class:`CamError`),
``images`` (:class:`Sample`, :func:`load_images`, :func:`photo_samples`, :func:`scene_samples`, the
preprocessing), ``gradcam`` (:func:`compute_cams`, :func:`gradcam_grid`, the figure helpers),
``localisation`` (:func:`localisation_score`: energy in box, pointing game), ``baselines`` (:func:`baseline_maps`:
brightness, centre prior, uniform), ``faithfulness`` (:func:`road_scores`: pytorch-grad-cam's ROAD), ``scoring``
(:func:`score_scenes`, :func:`summarise`, :func:`size_bins`, :func:`score_models`: a model's maps of the predicted
class on the correctly classified scenes, beside the baselines, by item size), ``study`` (:func:`score_study` of an
``openaff study`` folder), ``attention`` (:func:`attention_maps`), ``cli`` (``openaff cam`` and
``openaff attention``; its docstring is the commands' full description).
"""

from .attention import AttentionMap, AttentionResult, attention_maps
from .baselines import BASELINES, baseline_maps, brightness_map, centre_prior, uniform_map
from .cli import add_parser
from .faithfulness import ROAD_PERCENTILES, road_scores
from .gradcam import METHODS, CamGrid, compute_cams, gradcam_grid
from .images import IMAGE_SUFFIXES, PHOTOS, Sample, load_images, photo_samples, scene_samples
from .images import _preprocess as _preprocess
from .localisation import Localisation, localisation_score
from .models import CamError, CamModel, default_target_layer, load_model
from .scoring import SceneScores, score_models, score_scenes, size_bins, summarise
from .study import SCENE_SETS, StudyScore, score_study
from .study import study_markdown as study_markdown

__all__ = ["BASELINES", "IMAGE_SUFFIXES", "METHODS", "PHOTOS", "ROAD_PERCENTILES", "SCENE_SETS", "AttentionMap",
           "AttentionResult", "CamError", "CamGrid", "CamModel", "Localisation", "Sample", "SceneScores", "StudyScore",
           "add_parser", "attention_maps", "baseline_maps", "brightness_map", "centre_prior", "compute_cams",
           "default_target_layer", "gradcam_grid", "load_images", "load_model", "localisation_score",
           "photo_samples", "road_scores", "scene_samples", "score_models", "score_scenes", "score_study",
           "size_bins", "summarise", "uniform_map"]
