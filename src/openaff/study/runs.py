"""The runs of a study: one run folder per cell, its state (finished, resumable, new), and the processes
that train them."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

import openaff

from ..errors import OpenAFFError, one_line
from ..files import atomic_write
from ..training.config import TrainConfig, to_yaml
from ..training.history import write_csv
from ..training.resume import RESUMABLE, load_resume_checkpoint
from ..training.run_folder import CONFIG_FILE, read_run_config, read_run_metrics
from ..training.train import RUN_FILES
from .scenarios import StudyError

# Differences between a run folder's config.yaml and the study's that do not change the numbers.
IGNORED_FIELDS = {"output", "recipe", *RESUMABLE}


@dataclass
class Cell:
    fusion: str
    depth: int
    seed: int
    cfg: TrainConfig
    params: int | None = None
    gmacs: float | None = None

    @property
    def name(self) -> str:
        return f"{self.fusion}-b{self.depth}-s{self.seed}"

    @property
    def folder(self) -> Path:
        return Path(self.cfg.output)


@dataclass
class RunRecord:
    """One run of a study, as study.json and results.csv list it (metric values in the metric's unit, e.g. %)."""

    fusion: str
    depth: int
    seed: int
    folder: str
    status: str  # finished | unfinished | missing
    epochs: int | None = None
    best: float | None = None
    best_epoch: int | None = None
    final: float | None = None
    params: int | None = None
    gmacs: float | None = None
    seconds: float | None = None
    # From the run's test.json (a held-out validation split chose the epoch): the test split's metric with the
    # selected weights, with the final weights, and with the selected weights by pasted item side ("14-18": %).
    test: float | None = None
    test_final: float | None = None
    test_by_size: dict | None = None


def yaml_data(cfg: TrainConfig) -> dict:
    return yaml.safe_load(to_yaml(cfg))


def config_differences(old: dict, new: dict, ignore: set[str]) -> list[str]:
    return [k for k in dict.fromkeys([*new, *old]) if k not in ignore and old.get(k) != new.get(k)]


def _check_cell_config(cell: Cell) -> None:
    """Refuse a run folder that holds another configuration than the one the study asks for it."""
    if not (cell.folder / CONFIG_FILE).is_file():
        held = [n for n in RUN_FILES if (cell.folder / n).exists()]
        if held:
            raise StudyError(f"{cell.folder} holds {', '.join(held)} but no config.yaml: not a run of this study; "
                             "move it away")
        return
    old, new = read_run_config(cell.folder), yaml_data(cell.cfg)
    diff = config_differences(old, new, IGNORED_FIELDS)
    if diff:
        k = diff[0]
        more = f" (and {len(diff) - 1} more setting(s))" if len(diff) > 1 else ""
        raise StudyError(f"{cell.folder} was trained with {k}={old.get(k)!r}, this study asks for {new.get(k)!r}"
                         f"{more}; give another --output, or delete that run folder to train it anew")


def cell_state(cell: Cell) -> str:
    """``finished``, ``resume`` (last.pt of an unfinished run), ``restart`` (files, nothing to resume) or ``new``."""
    if not cell.folder.is_dir() or not any(cell.folder.iterdir()):
        return "new"
    _check_cell_config(cell)
    if len(read_run_metrics(cell.folder)) >= cell.cfg.epochs:
        return "finished"
    if (cell.folder / "last.pt").is_file():
        ckpt = load_resume_checkpoint(cell.folder)
        if ckpt["epoch"] >= cell.cfg.epochs:
            # Killed between writing last.pt and metrics.csv of the last epoch: the rows are in the checkpoint.
            write_csv(ckpt["history"], cell.folder / "metrics.csv")
            return "finished"
        return "resume"
    return "restart" if any((cell.folder / n).exists() for n in RUN_FILES) else "new"


def run_record(fusion: str, depth: int, seed: int, folder: Path, metric: str, epochs: int | None,
            facts: tuple[int, float] | None) -> RunRecord:
    rec = RunRecord(fusion, depth, seed, str(folder), "missing", epochs)
    if facts is not None:
        rec.params, rec.gmacs = facts
    rows = [r for r in read_run_metrics(folder) if isinstance(r.get(metric), float)]
    if not rows:
        rec.status = "unfinished" if folder.is_dir() and any(folder.iterdir()) else "missing"
        return rec
    best = max(rows, key=lambda r: r[metric])  # the first epoch of the highest value
    rec.best, rec.best_epoch, rec.final = best[metric], best["epoch"], rows[-1][metric]
    rec.seconds = sum(r.get("seconds") or 0.0 for r in rows)
    rec.status = "finished" if epochs is not None and len(rows) >= epochs else "unfinished"
    test = _read_test(folder) if rec.status == "finished" else None
    if test is not None:
        key = metric.replace("val_", "test_", 1)
        rec.test, rec.test_final = test["selected"].get(key), test["final"].get(key)
        by_size = test["selected"].get("by_size") or []
        rec.test_by_size = {f"{b['sides'][0]}-{b['sides'][1]}": b.get("top1", b.get("scene_acc"))
                            for b in by_size} or None
    return rec


def _read_test(folder: Path) -> dict | None:
    path = folder / "test.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise StudyError(f"cannot read {path}: {err}") from None
    if not isinstance(data, dict) or not isinstance(data.get("selected"), dict) or \
            not isinstance(data.get("final"), dict):
        raise StudyError(f"{path} is not a run's test scores")
    return data


def progress_printer(progress: bool) -> Callable[[str], None]:
    if progress:
        from tqdm import tqdm

        return lambda s: tqdm.write(s, file=sys.stdout)
    return lambda s: print(s, flush=True)


def done_line(cell: Cell, metric: str) -> str:
    rec = run_record(cell.fusion, cell.depth, cell.seed, cell.folder, metric, cell.cfg.epochs, None)
    if rec.best is None:
        return f"{cell.name}: no {metric} recorded"
    return (f"{cell.name}: best {metric} {rec.best:.2f} (epoch {rec.best_epoch + 1}), final {rec.final:.2f}, "
            f"{rec.seconds:.0f} s")


def train_in_process(cell: Cell, state: str, log: Path, trainer: Callable) -> None:
    with log.open("a") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        print(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {state} {cell.name}", flush=True)
        try:
            if state == "resume":
                trainer(cell.cfg, resume=cell.folder)
            else:
                trainer(cell.cfg, overwrite=state == "restart")
        except OpenAFFError as err:
            print(f"openaff train: error: {one_line(err)}", flush=True)
            raise StudyError(f"run {cell.name} failed: {one_line(err)} (log: {log})") from None


def _child_env(threads: int | None) -> dict[str, str]:
    src = str(Path(openaff.__file__).resolve().parents[1])  # the children import this very openaff
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


@functools.cache
def _prctl() -> Callable | None:
    import ctypes

    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def _die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child get SIGKILL when the study dies (Linux), else None.

    A SIGKILLed study must not leave its runs training on: they would race the restarted study's.
    The function is looked up here, in the parent: between fork and exec the child may not import.
    """
    prctl = _prctl() if sys.platform == "linux" else None
    if prctl is None:
        return None
    return lambda: prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def spawn_cell(cell: Cell, state: str, log: Path) -> subprocess.Popen:
    threads = cell.cfg.threads or 1
    cmd = [sys.executable, "-m", "openaff", "train", "--no-progress", "--threads", str(threads)]
    if state == "resume":
        cmd += ["--resume", str(cell.folder)]
    else:
        recipe = log.with_suffix(".yaml")
        atomic_write(recipe, lambda f: f.write(to_yaml(cell.cfg).encode()))
        cmd += ["--recipe", str(recipe)] + (["--overwrite"] if state == "restart" else [])
    out = log.open("ab")
    out.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {state} {cell.name}: {shlex.join(cmd)}\n".encode())
    out.flush()
    try:
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                env=_child_env(threads), preexec_fn=_die_with_parent())
    finally:
        out.close()


def child_error(cell: Cell, rc: int, log: Path) -> StudyError:
    lines = log.read_text(errors="replace").splitlines() if log.is_file() else []
    errors = [ln for ln in lines if ln.startswith("openaff train: error: ")]
    if errors:
        return StudyError(f"run {cell.name} failed: {errors[-1].removeprefix('openaff train: error: ')} (log: {log})")
    return StudyError(f"run {cell.name} failed with exit status {rc} (log: {log})")


def stop_children(running: dict[subprocess.Popen, Cell], grace: float = 120.0) -> None:
    """SIGINT every run (it stops at its last checkpoint), wait for them, kill those that do not stop."""
    for proc in running:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGINT)
    deadline = time.monotonic() + grace
    for proc in running:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_parallel(todo: list[tuple[Cell, str]], jobs: int, logs: Path, on_done: Callable[[Cell], None]) -> None:
    queue = list(todo)
    running: dict[subprocess.Popen, Cell] = {}
    failure: StudyError | None = None
    try:
        while queue or running:
            while queue and len(running) < jobs and failure is None:
                cell, state = queue.pop(0)
                running[spawn_cell(cell, state, logs / f"{cell.name}.log")] = cell
            if not running:
                break
            time.sleep(0.2)
            for proc in [p for p in running if p.poll() is not None]:
                cell = running.pop(proc)
                if proc.returncode == 0:
                    on_done(cell)
                elif proc.returncode == 130:
                    raise KeyboardInterrupt  # a run was interrupted from outside: stop the study the same way
                elif failure is None:
                    failure = child_error(cell, proc.returncode, logs / f"{cell.name}.log")
            if failure is not None and not running:
                raise failure
    except BaseException:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not orphan the runs
        try:
            stop_children(running)
        finally:
            signal.signal(signal.SIGINT, previous)
        raise


@contextlib.contextmanager
def study_lock(folder: Path):
    import fcntl  # POSIX; imported here so that `openaff` itself loads everywhere

    path = folder / ".study.lock"
    with path.open("a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            pid = f.read().strip() or "?"
            raise StudyError(f"{folder} is in use by another openaff study (pid {pid})") from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        yield
