"""Where the networks look: Grad-CAM grids (the paper's Figure 6), MS-CAM attention maps, a localisation score.

``openaff cam`` draws one grid PNG: a row per image, a column per model, each panel the class
activation map (``pytorch-grad-cam``: ``--method gradcam``, ``gradcam++``, ``layercam``, ...) over
the image the model sees, captioned with the class the map explains (by default the predicted one)
and its softmax score; a wrong prediction is captioned in red with the true class, when it is known.

* Models: our registered names, any timm name (random weights unless ``--weights``), a training
  run's folder or ``local-dir:DIR`` (timm's hub layout), or one of our ``.safetensors`` files (from
  ``openaff train`` or ``openaff convert``). The model's own ``pretrained_cfg`` (or the run's
  recorded one) gives the input size, resize/centre-crop and mean/std; class names come from the
  weights' metadata (ImageNet-sized classifiers without names get timm's ImageNet names).
* The target layer: the last entry of the model's ``feature_info`` (the last stage's output: ``layer4``
  of the ResNets, ``layer3`` of the small-image ResNeXts, ``act_final`` of the pre-activation ResNets,
  whose last stage is followed by its BN-ReLU), else the last convolution; ``--target-layer PATH``
  (a module path such as ``layer3.0``) overrides it.
* Images: files, folders of them, ``--data fashion-mnist-scenes --indices 0,1,2`` (validation scenes
  with their class and box, drawn on the panels) or ``--data photos`` (scikit-image's astronaut,
  chelsea and coffee). Scenes are resized to the model's input size whole (no crop), so the box stays.

``openaff cam --study DIR`` scores every finished run of an ``openaff study`` folder on
``fashion-mnist-scenes`` (the first ``--limit`` test scenes at its canvas size): the Grad-CAM of the
*predicted* class on the scenes the run classifies correctly, by the fraction of the map's energy (its
sum) inside the item's box, the pointing game (the map's maximum inside the box) and ROAD
(pytorch-grad-cam's faithfulness metric, on the first ``--road-limit`` correct scenes), each beside
three maps that know nothing of the model, on the same scenes: the image's brightness (minus its
median, clipped at 0), a centre prior and a uniform map; in total and in ``--size-bins`` bins of the
item's pasted side; on the study's scenes and on the same scenes without clutter (``--sets``). Per
run and per fusion type (mean ± std over seeds; the gain over the brightness map with a 95 %
interval). It writes ``localisation.md`` (with the command, the machine and the wall time),
``localisation.csv`` (one row per run and scene set), ``localisation.json`` and ``grid.png``
(Figure-6 style: one row per scene, one column per fusion type, its lowest seed).

``openaff attention MODEL IMAGE`` draws, for one model and image, the MS-CAM weights ``w`` of every
fusion block (mean over channels) and the contributions of its two branches (the local branch's
logits mean over channels as a map, the global branch's per-channel logits), one row per block,
grouped by stage. The maps are read with forward hooks on the MS-CAMs' branches; the model is not
changed.

Python: :func:`gradcam_grid`, :func:`attention_maps`, :func:`localisation_score`, :func:`score_models`,
:func:`score_scenes`, :func:`score_study`, :func:`road_scores`, :func:`baseline_maps`, with :func:`load_model`,
:func:`load_images`, :func:`scene_samples` and :func:`photo_samples` to build their inputs.

Examples::

    openaff cam resnet50d seresnet50 aff_resnet50 --data photos -o cam.png
    openaff cam runs/demo --data fashion-mnist-scenes --indices 0-7 --method gradcam++ -o scenes.png
    openaff cam --study results/study-cpu/short-skip -o results/cam/short-skip
    openaff attention runs/demo --data fashion-mnist-scenes --indices 3 -o attention.png
"""

from __future__ import annotations

import argparse

from ..errors import ConfigError, flag_type, run_command
from ..photos import PHOTOS
from ..training.config import parse_model_kwargs
from .attention import attention_maps
from .gradcam import METHODS, gradcam_grid
from .images import Sample, load_images, photo_samples, scene_samples
from .models import load_model
from .study import SCENE_SETS, score_study, study_markdown

__all__ = ["add_parser"]

DATA_CHOICES = ("fashion-mnist-scenes", "photos")


def _indices(text: str) -> list[int]:
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        try:
            if sep and lo:
                a, b = int(lo), int(hi)
                if b < a:
                    raise ValueError
                out += list(range(a, b + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise ConfigError(f"--indices: expected integers or ranges such as 0,3,5-7, got {part!r}") from None
    if not out:
        raise ConfigError("--indices: no index given")
    return out


def _samples_from_args(args: argparse.Namespace, canvas: int | None) -> list[Sample]:
    given = [bool(args.images), args.data is not None]
    if sum(given) != 1:
        raise ConfigError("give the images: image files/folders, or --data fashion-mnist-scenes|photos")
    if args.images:
        labels = None
        if args.labels:
            labels = [t.strip() for t in args.labels.split(",")]
            labels = [int(t) if t.lstrip("-").isdigit() else t for t in labels]
        return load_images(args.images, labels)
    if args.labels:
        raise ConfigError("--labels is for image files; the scenes know theirs and the photos have none")
    if args.data == "photos":
        names = [t.strip() for t in args.indices.split(",")] if args.indices else list(PHOTOS)
        if names and all(n.isdigit() for n in names):
            names = [PHOTOS[int(n)] if int(n) < len(PHOTOS) else n for n in names]
        return photo_samples(names)
    return scene_samples(_indices(args.indices or "0-3"), canvas=canvas or 64, split=args.split or "val",
                         data_dir=args.data_dir)


def _target_arg(text: str | None) -> int | str:
    if text is None:
        return "predicted"
    return int(text) if text.lstrip("-").isdigit() else text


def _run_cam(args: argparse.Namespace) -> int:
    if args.study is not None:
        if args.models or args.images or args.data or args.weights:
            raise ConfigError("--study scores the study's own runs on its scenes; drop the models and images")
        if args.target_class is not None:
            raise ConfigError("--study scores maps of the predicted class on correctly classified scenes; "
                              "drop --target-class")
        grid = _indices(args.grid_indices) if args.grid_indices else [0, 1, 2, 3, 4, 5]
        sets = [t.strip() for t in args.sets.split(",") if t.strip()]
        result = score_study(args.study, args.output, limit=args.limit, split=args.split or "test",
                             method=args.method, sets=sets, road_limit=args.road_limit, bins=args.size_bins,
                             tolerance=args.tolerance, grid_indices=grid)
        print(study_markdown(result), end="")
        print(f"wrote {', '.join(str(p) for p in result.paths.values())}")
        return 0
    if not args.models:
        raise ConfigError("give at least one MODEL (a timm name, a run folder or a .safetensors file), or --study DIR")
    if args.weights is not None and len(args.weights) != len(args.models):
        raise ConfigError(f"--weights: {len(args.weights)} sources for {len(args.models)} models "
                          "(one per model, 'none' for random weights)")
    kwargs = parse_model_kwargs(args.model_kwargs)
    titles = [t.strip() for t in args.titles.split(",")] if args.titles else None
    cms = [load_model(m, None if args.weights is None or args.weights[j] == "none" else args.weights[j],
                      model_kwargs=kwargs, img_size=args.img_size, target_layer=args.target_layer,
                      label=None if titles is None or j >= len(titles) else titles[j])
           for j, m in enumerate(args.models)]
    if titles is not None and len(titles) != len(cms):
        raise ConfigError(f"--titles: {len(titles)} titles for {len(cms)} models")
    samples = _samples_from_args(args, cms[0].input_size[1])
    grid = gradcam_grid(cms, samples, output=args.output, method=args.method, target=_target_arg(args.target_class))
    for i, s in enumerate(grid.samples):
        for j, cm in enumerate(cms):
            mark = {True: "", False: "  WRONG", None: ""}[grid.correct[i][j]]
            print(f"{s.name}\t{cm.label}\t{cm.class_name(int(grid.targets[i, j]))} {grid.scores[i, j]:.3f}{mark}")
    print(f"wrote {grid.path} ({len(grid.samples)} x {len(cms)} panels, {args.method} at "
          f"{', '.join(dict.fromkeys(cm.target_layer for cm in cms))})")
    return 0


def _run_attention(args: argparse.Namespace) -> int:
    kwargs = parse_model_kwargs(args.model_kwargs)
    cm = load_model(args.model, None if args.weights in (None, "none") else args.weights, model_kwargs=kwargs,
                    img_size=args.img_size)
    args.images = [args.image] if args.image else []
    samples = _samples_from_args(args, cm.input_size[1])
    if len(samples) != 1:
        raise ConfigError(f"openaff attention draws one image; {len(samples)} given (pick one with --indices)")
    result = attention_maps(cm, samples[0], output=args.output)
    for am in result.maps:
        share = f", local share {am.local_share:.2f}" if am.local_share is not None else ""
        print(f"{am.name}\t{am.size[0]}x{am.size[1]}\tw mean {float(am.weight.mean()):.3f} "
              f"(min {float(am.weight.min()):.3f}, max {float(am.weight.max()):.3f}){share}")
    print(f"wrote {result.path} ({len(result.maps)} MS-CAMs; predicted {cm.class_name(result.predicted)} "
          f"{result.score:.2f})")
    return 0


_positive_int = flag_type(int, what="an integer", lo=1)
_scene_count = flag_type(int, what="a number of scenes or 'all'", lo=0)


def _road_limit(text: str) -> int | None:
    return None if text == "all" else _scene_count(text)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", choices=DATA_CHOICES, default=None,
                   help="built-in images: fashion-mnist-scenes (validation scenes with class and box) or photos "
                        "(scikit-image's astronaut, chelsea, coffee)")
    p.add_argument("--indices", default=None, help="scene indices, e.g. 0,1,2 or 0-7 (default 0-3; scenes are made "
                   "at the first model's input size); photo names for --data photos")
    p.add_argument("--split", choices=("val", "test", "train"), default=None,
                   help="scenes' split (default val; with --study test)")
    p.add_argument("--data-dir", default=None, metavar="DIR",
                   help="the Fashion-MNIST idx files of the scenes (default: the Debian package's folder)")
    p.add_argument("--labels", default=None, help="true classes of the image files, comma-separated (index or name)")
    p.add_argument("--model-kwargs", nargs="*", default=[], metavar="KEY=VALUE",
                   help="timm.create_model arguments for models given by name, e.g. width_mult=0.25 in_chans=1")
    p.add_argument("--img-size", type=_positive_int, default=None, help="input side (default: the model's)")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add ``openaff cam`` and ``openaff attention`` (those not added yet: both COMMANDS entries name this module)."""
    if "cam" not in subparsers.choices:
        _add_cam(subparsers)
    if "attention" not in subparsers.choices:
        _add_attention(subparsers)


def _add_cam(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("cam", help="Grad-CAM grids (the paper's Figure 6) and a localisation score",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="*", metavar="MODEL",
                   help="timm model names, run folders, local-dir:DIR or .safetensors files (one grid column each)")
    p.add_argument("--images", nargs="+", default=None, metavar="PATH", help="image files or folders (one row each)")
    _add_common(p)
    p.add_argument("--weights", nargs="+", default=None, metavar="W",
                   help="one weight source per MODEL ('none': random weights)")
    p.add_argument("--method", default="gradcam", help=f"CAM method: {' | '.join(METHODS)} (default gradcam)")
    p.add_argument("--target-layer", default=None, metavar="PATH",
                   help="module path of the CAM's layer (default: the last stage's output, per family)")
    p.add_argument("--target-class", default=None, metavar="K",
                   help="the class each map explains: predicted (default), label (the true class), an index or a name")
    p.add_argument("--titles", default=None, help="column titles, comma-separated")
    p.add_argument("--study", metavar="DIR", default=None,
                   help="score every finished run of an openaff study folder (localisation table + grid)")
    p.add_argument("--limit", type=_positive_int, default=2000, help="--study: scenes per set (default 2000)")
    p.add_argument("--road-limit", type=_road_limit, default=100, metavar="N",
                   help="--study: correctly classified scenes per run and set that get ROAD (default 100; 0: no "
                        "ROAD; all)")
    p.add_argument("--size-bins", type=_positive_int, default=4, metavar="K",
                   help="--study: bins of the item's pasted side (default 4)")
    p.add_argument("--sets", default=",".join(SCENE_SETS),
                   help=f"--study: scene sets, comma-separated (default {','.join(SCENE_SETS)}: the study's scenes "
                        "and the same without clutter)")
    p.add_argument("--tolerance", type=float, default=0.0, help="--study: pointing-game tolerance in pixels")
    p.add_argument("--grid-indices", default=None, help="--study: the grid's scenes (default 0-5)")
    p.add_argument("-o", "--output", default=None,
                   help="the grid PNG (default cam.png); with --study the folder (default DIR/cam)")
    p.set_defaults(func=lambda args: run_command("openaff cam", lambda: _run_cam(_default_out(args, "cam.png"))))


def _add_attention(subparsers: argparse._SubParsersAction) -> None:
    a = subparsers.add_parser("attention", help="MS-CAM attention maps of every fusion block for one image",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a.add_argument("model", metavar="MODEL", help="timm model name, run folder, local-dir:DIR or .safetensors file")
    a.add_argument("image", nargs="?", default=None, metavar="IMAGE", help="an image file (or use --data)")
    _add_common(a)
    a.add_argument("--weights", default=None, metavar="W", help="weight source for a MODEL given by name")
    a.add_argument("-o", "--output", default="attention.png", help="the PNG to write (default attention.png)")
    a.set_defaults(func=lambda args: run_command("openaff attention", lambda: _run_attention(args)))


def _default_out(args: argparse.Namespace, default: str) -> argparse.Namespace:
    if args.output is None and args.study is None:
        args.output = default
    return args
