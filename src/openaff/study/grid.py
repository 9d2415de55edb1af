"""The grid of a study: its cells (fusion x depth x seed), run in processes or jobs (:func:`run_study`)."""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from ..errors import ConfigError, check_int, one_line
from ..training.config import make_config
from ..training.train import fresh_run_folder, train
from .launcher import make_launcher, run_cells
from .report import StudyResult, _aggregate, _write_outputs, resolve_contrasts
from .runs import Cell, cell_state, done_line, progress_printer, run_parallel, study_lock, train_in_process
from .scenarios import SCENARIOS, Scenario, StudyError
from .settings import (
    OVERRIDES,
    StudySettings,
    _adopt,
    _base_config,
    _base_data,
    _data_facts,
    _depth,
    _facts_of,
    _fusions,
    _parse_list,
)


def _command_line(s: StudySettings, data: str, output: Path, overrides: dict, cifar100_labels: str | None,
                  runtime: dict) -> str:
    parts = ["openaff", "study", "--scenario", s.scenario]
    if s.family != next(iter(SCENARIOS[s.scenario].families)):
        parts += ["--family", s.family]
    parts += (["--table", str(s.table)] if s.table is not None else ["--fusions", ",".join(s.fusions)])
    parts += ["--depths", ",".join(map(str, s.depths)), "--seeds", str(s.seeds), "--data", data,
              "--recipe", s.recipe]
    for key in OVERRIDES:
        if overrides.get(key) is not None:
            parts += [f"--{key.replace('_', '-')}", str(overrides[key])]
    if cifar100_labels is not None:
        parts += ["--cifar100-labels", cifar100_labels]
    for key, value in runtime.items():  # not part of the numbers, but the way to continue as it ran
        if value is not None:
            parts += [f"--{key}", str(value)]
    return shlex.join([*parts, "--output", str(output)])


def run_study(output: str | Path | None = None, *, scenario: str = "short-skip", fusions: str | Sequence[str] | None
              = None, table: int | None = None, depths: str | Sequence[int] = (1, 2, 3, 4), seeds: int = 3,
              data: str | None = None, recipe: str = "study-cpu", family: str | None = None,
              epochs: int | None = None, limit_train: int | None = None, limit_val: int | None = None,
              width_mult: float | None = None, threads: int | None = None, cifar100_labels: str | None = None,
              jobs: int = 1, progress: bool = True, launcher: str | None = None,
              launcher_config: str | dict | None = None, contrasts: str | None = None) -> StudyResult:
    """Train the study's missing runs and aggregate all of them; the Python API of ``openaff study``.

    Args:
        output: the study folder (default: a fresh ``runs/study-<scenario>-<data>-<time>``); an existing one continues.
        scenario: a name of :data:`SCENARIOS` (``same-layer``, ``short-skip``).
        fusions: fusion type names (comma-separated or a list; default: the seven of the paper's Table 4).
        table: 3, 4 or 6: the fusion types of that paper table (instead of ``fusions``).
        depths: blocks per stage b (comma-separated or a list).
        seeds: the runs of a cell use seeds 0 .. seeds-1.
        data: ``fashion-mnist``, ``fashion-mnist-scenes``, ``cifar10:DIR`` or ``cifar100:DIR`` (coarse labels);
            default: the recipe's.
        recipe: the base training recipe (a shipped name or a YAML path).
        family: the scenario's model family (short-skip: ``resnet`` or ``resnext``).
        epochs: overrides the recipe's.
        limit_train: train on the first N images only.
        limit_val: validate on the first N images only.
        width_mult: the models' width multiplier (overrides the recipe's model_kwargs).
        threads: CPU threads per run (default with ``jobs`` > 1: 1; with 1 job: the recipe's).
        cifar100_labels: ``coarse`` (default for cifar100, as the paper) or ``fine``.
        jobs: runs trained at a time, each in its own process (1: one after the other in this process).
        launcher: ``local`` (default: this process, or its pool with ``jobs`` > 1), ``slurm`` or
            ``submitit-local``: each run a submitit job (:mod:`openaff.study.launcher`).
        launcher_config: the launcher's options, a YAML file, ``KEY=VALUE,...`` or a dict.
        progress: a progress bar over the grid.

    Raises:
        StudyError: a bad setting (before anything trains), a run folder that belongs to another
            configuration, or a run that failed (the others keep their results).
        KeyboardInterrupt: Ctrl-C; its note gives the command that continues the study.
    """
    scn = SCENARIOS.get(scenario)
    if scn is None:
        raise StudyError(f"unknown scenario {scenario!r}; choose one of {', '.join(SCENARIOS)}")
    family_name, fam = scn.family(family)
    names = _fusions(fusions, table)
    pairs = resolve_contrasts(contrasts, names)  # bad contrasts stop before anything trains
    depth_list = _parse_list(depths, "depths", _depth)
    check_int(seeds, "--seeds must be an integer >= 1 (the runs use seeds 0 .. N-1)", error=StudyError)
    check_int(jobs, "--jobs must be an integer >= 1", error=StudyError)
    runner = make_launcher(launcher, launcher_config, jobs)
    if threads is None and jobs > 1:
        threads = 1  # separate single-threaded processes: the fastest use of a small CPU
    overrides = dict(epochs=epochs, limit_train=limit_train, limit_val=limit_val, width_mult=width_mult)
    base = _base_config(scn, recipe, data, cifar100_labels, overrides, threads)
    base = replace(base, progress=False)  # one bar over the grid instead
    facts = _data_facts(base)
    settings = StudySettings(scenario, family_name, names, depth_list, seeds, table, recipe, _base_data(base))
    data_spec = base.data + (f":{base.data_dir}" if base.data_dir else "")
    models = {}  # every model is built (on the meta device) before any folder is made: bad settings stop here
    for b in depth_list:
        for fusion in names:
            model, kwargs = scn.model(fusion, b, family_name)
            kwargs = {**base.model_kwargs, **kwargs}
            models[fusion, b] = model, kwargs, _facts_of(model, kwargs, *facts)

    if output is None:
        out = fresh_run_folder("runs", f"study-{scenario}-{base.data}")
    else:
        out = Path(output)
        if out.exists() and not out.is_dir():
            raise StudyError(f"--output {out} is a file, not a folder")
    settings = _adopt(out, settings)
    cells = []
    for seed in range(seeds):  # seed-major: a partial study has every cell once before any twice
        for b in depth_list:
            for fusion in names:
                model, kwargs, (params, gmacs) = models[fusion, b]
                cell_dir = out / "runs" / f"{fusion}-b{b}-s{seed}"
                try:
                    cfg = make_config({**asdict(base), "model": model, "model_kwargs": kwargs, "seed": seed,
                                       "output": str(cell_dir)})
                except ConfigError as err:
                    raise StudyError(f"run {fusion}-b{b}-s{seed}: {one_line(err)}") from None
                cells.append(Cell(fusion, b, seed, cfg, params, gmacs))
    command = _command_line(settings, data_spec, out, overrides, cifar100_labels,
                            dict(threads=base.threads, jobs=jobs if jobs > 1 else None,
                                 launcher=runner and runner.name, **{"launcher-config": runner and runner.given}))
    (out / "logs").mkdir(parents=True, exist_ok=True)
    with study_lock(out):
        return _execute(out, scn, settings, cells, command, jobs, progress, runner, pairs)


def _execute(out: Path, scn: Scenario, settings: StudySettings, cells: list[Cell], command: str, jobs: int,
             progress: bool, runner: Any = None, pairs: list[tuple[str, str]] | None = None) -> StudyResult:
    """Train what the study folder lacks (under its lock), keeping the tables up to date after every run."""
    states = {c.name: cell_state(c) for c in cells}  # refuses foreign folders before anything trains
    planned = {(c.fusion, c.depth, c.seed): (c.params, c.gmacs) for c in cells}
    todo = [(c, states[c.name]) for c in cells if states[c.name] != "finished"]
    say = progress_printer(progress)
    trained: list[str] = []

    def write(plot: bool = False) -> StudyResult:
        result = _aggregate(out, settings, planned, command, pairs)
        _write_outputs(result, command, plot=plot)
        return replace(result, trained=list(trained))

    def on_done(cell: Cell) -> None:
        trained.append(cell.name)
        bar.update(1)
        say(done_line(cell, scn.metric))
        write()

    write()
    bar = _bar(len(cells), len(cells) - len(todo), progress)
    try:
        if runner is not None:  # a launcher.Launcher: each run a submitit job
            run_cells(runner, todo, out, on_done)
        elif jobs == 1:
            for cell, state in todo:
                bar.set_postfix_str(cell.name, refresh=True)
                train_in_process(cell, state, out / "logs" / f"{cell.name}.log", scn.train or train)
                on_done(cell)
        else:
            run_parallel(todo, jobs, out / "logs", on_done)
    except KeyboardInterrupt:
        bar.close()
        write()
        stop = KeyboardInterrupt()
        stop.add_note(f"interrupted after {len(cells) - len(todo) + len(trained)} of {len(cells)} runs; "
                      f"continue with: {command}")
        raise stop from None
    except StudyError:
        bar.close()
        write()
        raise
    bar.close()
    result = write(plot=True)
    say(f"study: {sum(r.status == 'finished' for r in result.runs)} of {len(result.runs)} runs finished in {out}"
        f" ({len(trained)} trained now)\n  table: {out / 'table.md'}\n  runs:  {out / 'study.json'}, "
        f"{out / 'results.csv'}\n  plot:  {out / 'study.png'}")
    return result


def _bar(total: int, done: int, progress: bool):  # noqa: ANN202  (tqdm)
    from tqdm import tqdm

    return tqdm(total=total, initial=done, unit="run", desc="study", disable=not progress, dynamic_ncols=True)
