"""``openaff study``: the paper's fusion study as a grid of ordinary training runs, and its tables.

Every cell of the grid (fusion type × depth b × seed) is one ``openaff train`` run with its own run
folder, ``OUT/runs/<fusion>-b<b>-s<seed>`` (config.yaml, model.safetensors + config.json, metrics.csv,
last.pt), trained from one base recipe with only the model (scenario, fusion, b) and the seed
changed. The study is aggregated into ``OUT/table.md`` (fusion × depth: mean ± std over seeds of the
best validation metric over all epochs, as the authors reported; final-epoch metric; parameters;
the paper's number beside), ``OUT/study.json`` and ``OUT/results.csv`` (every run) and
``OUT/study.png`` (metric against depth and against parameters).

Examples::

    openaff study --scenario short-skip --fusions add,aff,iaff --depths 1 --seeds 3 --jobs 2
    openaff study --table 3 --data cifar100:~/data/cifar-100-python --recipe study-gpu
    openaff study --summarize runs/study-short-skip-fashion-mnist-20260101-120000

Rerunning the same command (with ``--output OUT``) continues a study: finished runs are read, an
interrupted one is resumed exactly from its last.pt, missing ones are trained. More fusion types,
depths or seeds may be added to a study; its base configuration (recipe, data, overrides) may not
change, and a run folder whose configuration differs from what the study asks is refused.
``--jobs N`` trains N runs at a time, each a single-threaded ``python -m openaff train`` process
(on a 2-core CPU two 1-thread processes beat one 2-thread one); the numbers are the same as with
``--jobs 1`` at the same thread count. Ctrl-C stops every run at its last checkpoint (exit 130).

A scenario (:data:`SCENARIOS`, :func:`register_scenario`) maps (fusion, b) to a timm model and
names the metrics.csv column it reads: ``same-layer`` (Inception-style cells,
``cifar_inception_resnet{6b+2}``) and ``short-skip`` (``cifar_resnet{6b+2}``, or
``cifar_resnext{9b+2}_32x4d`` with ``--family resnext``) read ``val_top1``; ``long-skip``
(``fpn_cifar_resnet{6b+2}``: the fusion in every top-down merge of the FPN, the encoder's blocks add;
a segmentation recipe, e.g. ``--recipe segment-cpu``) reads ``val_miou``.
"""

from .grid import run_study
from .paper import PAPER, TABLE_FUSIONS, paper_number
from .report import DEFAULT_CONTRASTS, StudyResult, plot_study, resolve_contrasts, study_markdown, summarize
from .runs import Cell, RunRecord
from .scenarios import SCENARIOS, Family, Scenario, StudyError, register_scenario, split_fusion_spec

__all__ = ["DEFAULT_CONTRASTS", "PAPER", "SCENARIOS", "TABLE_FUSIONS", "Cell", "Family", "RunRecord", "Scenario",
           "StudyError", "StudyResult", "paper_number", "plot_study", "register_scenario",
           "resolve_contrasts", "run_study", "split_fusion_spec", "study_markdown", "summarize"]
