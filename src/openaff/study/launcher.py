"""``openaff study --launcher``: a study's runs as submitit jobs, on a Slurm cluster or on this machine.

``--launcher local`` (the default) is the study's own process pool (``--jobs``). ``--launcher slurm`` submits
every run still to do as one Slurm job array through submitit; ``--launcher submitit-local`` runs the same jobs
as processes of this machine through submitit's local executor (what the tests use). Either way a job runs
what the local pool runs for a cell: one ``python -m openaff train`` process, started with ``--resume`` when
the run folder holds a ``last.pt``, and the study gathers the results as it does for the pool.

A job that Slurm times out or preempts is requeued by submitit and resumes from its ``last.pt``. The job ids
are kept in ``OUT/launcher/jobs.json``: a study whose process died (SIGKILL, a dropped login session) is
continued by rerunning its command, which waits for its jobs that still run and submits the others. Ctrl-C
cancels the study's jobs (each stops at its last checkpoint, as with the pool). A job holds
``OUT/logs/<run>.lock`` while it trains, so that two jobs never train one run folder.

``--launcher-config`` gives the executor's options, as a YAML file or inline ``KEY=VALUE,KEY=VALUE``. For
slurm these are submitit's ``SlurmExecutor`` parameters (sbatch's options: ``partition``, ``time`` in minutes,
``gpus_per_task``, ``cpus_per_task``, ``mem``, ``array_parallelism``, ``account``, ``qos``, ``constraint``,
``setup`` (shell lines run before the job, e.g. ``module load``), ``additional_parameters`` ...), plus
``python`` (the interpreter on the nodes) and ``max_num_timeout`` (requeues after a time-out, default 3).
For submitit-local: ``timeout_min``, ``gpus_per_node``, ``visible_gpus``, ``setup``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from ..files import atomic_write, read_yaml_mapping
from .runs import Cell, cell_state, child_error, spawn_cell, stop_children
from .scenarios import StudyError

__all__ = ["LAUNCHERS", "CellJob", "Launcher", "make_launcher", "parse_launcher_config"]

LAUNCHERS = ("local", "submitit-local", "slurm")

# Executor options of submitit-local (its LocalExecutor ignores unknown ones silently: checked here).
_LOCAL_OPTIONS = ("timeout_min", "gpus_per_node", "visible_gpus", "setup")
_CONSTRUCTOR = ("python", "max_num_timeout")  # arguments of SlurmExecutor() rather than of update_parameters
_SLURM_LIVE = {"PENDING", "RUNNING", "REQUEUED", "COMPLETING", "PREEMPTED", "CONFIGURING", "SUSPENDED", "RESIZING",
               "REQUEUE_HOLD", "REQUEUE_FED"}


def parse_launcher_config(config: str | dict | None) -> dict:
    """``--launcher-config``: a YAML file (a mapping), inline ``KEY=VALUE,KEY=VALUE`` (values read as YAML) or a dict.

    Args:
        config: the flag's value (None: no options).
    """
    if config is None:
        return {}
    if isinstance(config, dict):
        return dict(config)
    path = Path(config).expanduser()
    if path.is_file():
        data, why = read_yaml_mapping(path)
        if data is None:
            raise StudyError(f"--launcher-config {config}: "
                             + ("not a mapping of option: value" if why == "not a mapping" else why))
        return data
    out = {}
    for item in config.split(","):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise StudyError(f"--launcher-config must be a YAML file or KEY=VALUE,KEY=VALUE, got {config!r} "
                                   "(no such file either)")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise StudyError(f"--launcher-config: cannot read the value of {key.strip()}: {value!r}") from None
    return out


@dataclass
class Launcher:
    """How a study's runs are submitted: a submitit executor, its options and how many jobs run at a time.

    Args:
        name: ``submitit-local`` or ``slurm``.
        options: the executor's parameters (``update_parameters``).
        constructor: the executor's constructor arguments (slurm: ``python``, ``max_num_timeout``).
        parallel: jobs this process keeps running (None: all at once; Slurm's ``array_parallelism`` limits them).
        poll_s: seconds between two looks at the jobs.
        given: ``--launcher-config`` as the command line that continues the study gives it.
    """

    name: str
    options: dict = field(default_factory=dict)
    constructor: dict = field(default_factory=dict)
    parallel: int | None = None
    poll_s: float = 0.5
    given: str | None = None

    def executor(self, folder: Path) -> Any:
        import submitit

        try:
            if self.name == "slurm":
                ex = submitit.SlurmExecutor(folder=folder, **self.constructor)
            else:
                ex = submitit.LocalExecutor(folder=folder)
            ex.update_parameters(**self.options)
        except (ValueError, TypeError, RuntimeError) as err:
            raise StudyError(f"--launcher {self.name}: {str(err).splitlines()[0]}") from None
        return ex

    def alive(self, job: Any, folder: Path, found: bool = False) -> bool:
        """Whether the job still runs or waits in the queue (``found``: a job id of an earlier study process)."""
        if self.name == "slurm":
            if found:  # sacct says UNKNOWN of a job it does not know (any more): only a known live state counts
                try:
                    state = job.get_info().get("State") or "UNKNOWN"
                except Exception:  # (sacct failed: submit again; the run's lock keeps jobs apart)
                    return False
                return state.split()[0].upper() in _SLURM_LIVE
            return not job.done()
        # submitit's LocalJob knows only processes it started in this session; a job of a study process that
        # died is found by its controller's pid (the job id), checked to be that controller.
        if job.state == "RUNNING":
            return True
        try:
            cmdline = Path(f"/proc/{int(job.job_id)}/cmdline").read_bytes()
        except (OSError, ValueError):
            return False
        return b"submitit.local._local" in cmdline and str(folder).encode() in cmdline

    def cancel(self, job: Any, folder: Path) -> None:
        if self.name == "slurm":
            with contextlib.suppress(Exception):  # scancel failing must not hide the interruption
                job.cancel(check=False)
        elif self.alive(job, folder):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(job.job_id), signal.SIGINT)  # the controller stops its task, which stops its run


def make_launcher(name: str | None, config: str | dict | None, jobs: int) -> Launcher | None:
    """The launcher of ``--launcher NAME --launcher-config CONFIG`` (None: the local pool); refuses bad options.

    Args:
        name: one of :data:`LAUNCHERS` (None: local).
        config: ``--launcher-config`` (see :func:`parse_launcher_config`).
        jobs: ``--jobs``: runs at a time for submitit-local; with slurm only 1 (use ``array_parallelism``).
    """
    name = name or "local"
    if name not in LAUNCHERS:
        raise StudyError(f"--launcher must be one of {', '.join(LAUNCHERS)}, got {name!r}")
    options = parse_launcher_config(config)
    if name == "local":
        if options:
            raise StudyError("--launcher-config is for --launcher slurm or submitit-local, not the local pool")
        return None
    if name == "slurm":
        import submitit

        if submitit.SlurmExecutor.affinity() < 0:
            raise StudyError("--launcher slurm: no srun on this machine (run the study on a Slurm cluster's "
                                   "login node)")
        if jobs != 1:
            raise StudyError("--jobs is for the local launchers; with --launcher slurm set array_parallelism in "
                                   "--launcher-config")
        valid = {*submitit.SlurmExecutor._valid_parameters(), *_CONSTRUCTOR}
        constructor = {k: options.pop(k) for k in _CONSTRUCTOR if k in options}
        # submitit's default time is 5 minutes; a study's run takes hours (a timed-out job is requeued and resumes).
        options = {"job_name": "openaff-study", "time": 24 * 60, **options}
        launcher = Launcher(name, options, constructor, None, poll_s=15.0)
    else:
        valid = set(_LOCAL_OPTIONS)
        options = {"timeout_min": 7 * 24 * 60, **options}  # submitit's local default is 2 minutes
        launcher = Launcher(name, options, {}, jobs)
    if isinstance(config, dict):
        launcher.given = ",".join(f"{k}={json.dumps(v)}" for k, v in config.items()) or None
    else:
        launcher.given = config
    bad = sorted(set(options) - valid - set(_CONSTRUCTOR))
    if bad:
        raise StudyError(f"--launcher-config: unknown option(s) {', '.join(bad)} for --launcher {name}; valid: "
                               f"{', '.join(sorted(valid))}")
    return launcher


def _threads(launcher: Launcher, cell: Cell) -> Cell:
    """A Slurm run uses the CPUs of its task (``cpus_per_task``) unless ``--threads`` said otherwise."""
    cpus = launcher.options.get("cpus_per_task")
    if launcher.name == "slurm" and cell.cfg.threads is None and isinstance(cpus, int):
        return replace(cell, cfg=replace(cell.cfg, threads=cpus))
    return cell


@contextlib.contextmanager
def _hold(path: Path):
    """An exclusive lock on ``path`` for as long as the block runs (waits for another holder to let go)."""
    import fcntl

    with path.open("a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX)
        except OSError:  # a file system without locks (some NFS mounts): the job ids alone keep runs apart
            pass
        yield


class CellJob:
    """One run of a study as a submitit job: what the local pool spawns for it, decided when the job starts.

    Checkpointable (submitit requeues it after a time-out or preemption): the run stops at its last
    checkpoint and the requeued job resumes it.

    Args:
        cell: the study's run.
        log: the run's log (``OUT/logs/<run>.log``), which the training process appends to.
    """

    def __init__(self, cell: Cell, log: Path) -> None:
        self.cell, self.log = cell, log
        self._proc: subprocess.Popen | None = None

    def __call__(self) -> str:
        with _hold(self.log.with_suffix(".lock")):
            state = cell_state(self.cell)
            if state == "finished":  # trained by an earlier job of this study meanwhile
                return state
            self._proc = spawn_cell(self.cell, state, self.log)
            try:
                rc = self._proc.wait()
            except BaseException:  # cancelled (SIGINT) or requeued: the run stops at its last checkpoint
                self._stop()
                raise
            if rc != 0:
                raise child_error(self.cell, rc, self.log)
            return state

    def _stop(self, grace: float = 60.0) -> None:
        if self._proc is not None and self._proc.poll() is None:
            stop_children({self._proc: self.cell}, grace)

    def checkpoint(self) -> Any:
        """Called by submitit on time-out or preemption, before it requeues the job: the requeued job resumes."""
        from submitit.helpers import DelayedSubmission

        self._stop()
        return DelayedSubmission(CellJob(self.cell, self.log))

    def __getstate__(self) -> dict:
        return {"cell": self.cell, "log": self.log, "_proc": None}  # a process handle does not pickle


def _read_jobs(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def run_cells(launcher: Launcher, todo: list[tuple[Cell, str]], out: Path,
              on_done: Callable[[Cell], None]) -> None:
    """Train ``todo`` as submitit jobs, calling ``on_done(cell)`` as each run finishes; the study's process pool
    for ``--launcher slurm`` and ``submitit-local``.

    Args:
        launcher: from :func:`make_launcher`.
        todo: the runs to train and their states (the state is decided again when a job starts).
        out: the study folder (jobs in ``out/launcher``, logs in ``out/logs``).
        on_done: called with each finished run.
    """
    import submitit

    folder = out / "launcher"
    folder.mkdir(parents=True, exist_ok=True)
    executor = launcher.executor(folder)
    jobs_file = folder / "jobs.json"
    recorded = _read_jobs(jobs_file)
    job_class = submitit.SlurmJob if launcher.name == "slurm" else submitit.LocalJob
    queue: list[Cell] = []
    watching: dict[str, tuple[Cell, Any]] = {}
    for cell, _ in todo:
        rec = recorded.get(cell.name) or {}
        if rec.get("launcher") == launcher.name and rec.get("job_id"):
            job = job_class(folder=folder, job_id=str(rec["job_id"]))
            if launcher.alive(job, folder, found=True):  # a job of an earlier study process still trains this run
                watching[cell.name] = cell, job
                continue
        queue.append(cell)
    failure: StudyError | None = None
    try:
        while queue or watching:
            room = len(queue) if launcher.parallel is None else launcher.parallel - len(watching)
            if queue and room > 0 and failure is None:
                batch, queue = queue[:room], queue[room:]
                with executor.batch():  # Slurm: one job array
                    submitted = [executor.submit(CellJob(_threads(launcher, c), out / "logs" / f"{c.name}.log"))
                                 for c in batch]
                for cell, job in zip(batch, submitted, strict=True):
                    watching[cell.name] = cell, job
                    recorded[cell.name] = dict(launcher=launcher.name, job_id=job.job_id)
                atomic_write(jobs_file, lambda f: f.write((json.dumps(recorded, indent=2) + "\n").encode()))
            time.sleep(launcher.poll_s)
            for name, (cell, job) in list(watching.items()):
                if launcher.alive(job, folder):
                    continue
                del watching[name]
                if cell_state(cell) == "finished":
                    on_done(cell)
                elif failure is None:
                    failure = _job_error(cell, job, out / "logs" / f"{cell.name}.log")
            if failure is not None and not watching:
                raise failure
    except BaseException:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not orphan the jobs
        try:
            for _, job in watching.values():
                launcher.cancel(job, folder)
            deadline = time.monotonic() + (0 if launcher.name == "slurm" else 120)
            while any(launcher.alive(job, folder) for _, job in watching.values()) and time.monotonic() < deadline:
                time.sleep(0.2)
        finally:
            signal.signal(signal.SIGINT, previous)
        raise


def _job_error(cell: Cell, job: Any, log: Path) -> StudyError:
    lines = log.read_text(errors="replace").splitlines() if log.is_file() else []
    if any(ln.startswith("openaff train: error: ") for ln in lines):  # the run said why
        return child_error(cell, 1, log)
    return StudyError(f"run {cell.name}: job {job.job_id} ended without finishing it (log: {log}; the job's: "
                            f"{job.paths.stderr})")
