"""``openaff study --launcher``: submitit jobs (the local executor; Slurm's sbatch file), resuming after SIGKILL."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from _train_utils import ROOT, env, write_fashion_mnist

from openaff.study import Cell, StudyError, run_study
from openaff.study.launcher import CellJob, make_launcher
from openaff.training.config import make_config

pytest.importorskip("submitit")  # the `cluster` extra (make install installs it)

# 4 steps an epoch on 64 images, 3 epochs: a cell can be killed after its first epoch with two still to go.
RECIPE = dict(model="cifar_resnet8", model_kwargs=dict(width_mult=0.125), data="fashion-mnist", epochs=3,
              batch_size=16, lr=0.1, weight_decay=5e-4, sched="cosine", aug="crop-flip", crop_padding=2, workers=0)
COLUMNS = ("epoch", "train_loss", "val_loss", "val_top1", "val_top5")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("launcher-data")
    (root / "tiny.yaml").write_text(yaml.safe_dump(RECIPE))
    data = write_fashion_mnist(root / "fm", n_train=64, n_test=32)
    argv = ["--fusions", "add,aff", "--depths", "1", "--seeds", "1", "--data", f"fashion-mnist:{data}",
            "--recipe", str(root / "tiny.yaml"), "--limit-val", "32", "--jobs", "2", "--launcher", "submitit-local"]
    return dict(data=f"fashion-mnist:{data}", recipe=str(root / "tiny.yaml"), argv=argv)


@pytest.fixture(scope="module")
def unbroken(files, tmp_path_factory):
    """The 2-cell grid trained straight through in this process, at the thread count of the jobs (1)."""
    out = tmp_path_factory.mktemp("unbroken") / "s"
    return run_study(out, fusions="add,aff", depths="1", seeds=1, data=files["data"], recipe=files["recipe"],
                     limit_val=32, threads=1, progress=False)


def rows(folder: str | Path) -> list[list[str]]:
    with (Path(folder) / "metrics.csv").open() as f:
        return [[r[k] for k in COLUMNS] for r in csv.DictReader(f)]


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (from /proc's parent ids)."""
    parents = {}
    for d in Path("/proc").iterdir():
        with contextlib.suppress(OSError, ValueError, IndexError):
            if d.name.isdigit():
                parents[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
    out, frontier = [pid], [pid]
    while frontier:
        frontier = [p for p, parent in parents.items() if parent in frontier]
        out += frontier
    return out


def is_controller(pid: int) -> bool:
    """Whether ``pid`` is (still) a submitit-local job's controller process."""
    try:
        return b"submitit.local._local" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def kill_all(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def test_submitit_local_grid_resumes_after_sigkill_and_matches_the_unbroken_run(files, unbroken, tmp_path):
    """The 2-cell grid as submitit-local jobs; the study and one job are SIGKILLed in that run's second epoch
    (the other job trains on unbroken); rerunning the study waits for the one and resumes the other."""
    out = tmp_path / "s"
    argv = [sys.executable, "-m", "openaff", "study", *files["argv"], "--output", str(out), "--no-progress"]
    study_proc = subprocess.Popen(argv, env=env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    jobs_file = out / "launcher" / "jobs.json"
    pids: list[int] = []
    try:
        deadline = time.monotonic() + 240
        first = None
        while first is None:  # the first cell with an epoch written
            assert study_proc.poll() is None and time.monotonic() < deadline, "the study ended before an epoch"
            first = next((n for n in ("add-b1-s0", "aff-b1-s0") if (out / "runs" / n / "metrics.csv").is_file()),
                         None)
            time.sleep(0.05)
        jobs = json.loads(jobs_file.read_text())
        study_proc.kill()  # the study first: it must not see its job die
        study_proc.wait()
        pids = descendants(int(jobs[first]["job_id"]))  # the job's controller, its task, the training process
        kill_all(pids)
        other = "aff-b1-s0" if first == "add-b1-s0" else "add-b1-s0"
        alive = descendants(int(jobs[other]["job_id"]))  # the other job lives on, without its study
        assert len(alive) >= 2 and len(rows(out / "runs" / first)) < 3
        for pid in pids:  # gone (reaped by init), so that nothing trains the killed run any more
            deadline = time.monotonic() + 30
            while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
                time.sleep(0.05)
        killed_rows = rows(out / "runs" / first)
        assert 1 <= len(killed_rows) < 3 and (out / "runs" / first / "last.pt").is_file()

        result = run_study(out, fusions="add,aff", depths="1", seeds=1, data=files["data"], recipe=files["recipe"],
                           limit_val=32, jobs=2, launcher="submitit-local", progress=False)  # the same command
    finally:  # nothing of this test trains on after it, whatever happened
        study_proc.kill()
        for job in (json.loads(jobs_file.read_text()) if jobs_file.is_file() else {}).values():
            if is_controller(int(job["job_id"])):
                kill_all(descendants(int(job["job_id"])))
    assert [r.status for r in result.runs] == ["finished", "finished"]
    after = json.loads(jobs_file.read_text())
    assert {j["launcher"] for j in after.values()} == {"submitit-local"}
    assert after[other] == jobs[other]  # waited for (or found finished), not submitted again
    assert after[first] != jobs[first]  # the killed job: submitted again ...
    log = (out / "logs" / f"{first}.log").read_text()
    assert re.findall(r"--- \S+ \S+ (\w+) ", log) == ["new", "resume"]  # ... and it resumed the run
    assert "-m openaff train" in log and log.count("epoch 3/3") == 1
    assert rows(out / "runs" / first)[: len(killed_rows)] == killed_rows
    for name in ("add-b1-s0", "aff-b1-s0"):
        assert rows(out / "runs" / name) == rows(unbroken.output / "runs" / name)  # resume is exact
        job = after[name]["job_id"]
        assert (out / "launcher" / f"{job}_0_result.pkl").is_file()  # submitit's record: the job ended normally
    other_log = (out / "logs" / f"{other}.log").read_text()
    assert re.findall(r"--- \S+ \S+ (\w+) ", other_log) == ["new"] and other_log.count("epoch 3/3") == 1
    # The study's files are those of any study; the command that continues it names the launcher.
    doc = json.loads((out / "study.json").read_text())
    assert [c["n"] for c in doc["cells"]] == [1, 1]
    assert doc["command"].endswith(f"--jobs 2 --launcher submitit-local --output {out}")


def test_a_failing_job_stops_the_study_with_one_line(files, tmp_path):
    # The study reads the validation images only; the training images are broken, so the run fails in its job.
    data = write_fashion_mnist(tmp_path / "fm", n_train=64, n_test=32)
    (data / "train-images-idx3-ubyte.gz").write_bytes(b"not gzip")
    with pytest.raises(StudyError) as info:
        run_study(tmp_path / "s", fusions="aff", depths="1", seeds=1, data=f"fashion-mnist:{data}",
                  recipe=files["recipe"], limit_val=32, launcher="submitit-local", progress=False)
    message = str(info.value)
    assert message.startswith("run aff-b1-s0 failed: ") and message.endswith(f"(log: {tmp_path}/s/logs/aff-b1-s0.log)")
    assert "\n" not in message and "train-images-idx3-ubyte.gz" in message
    doc = json.loads((tmp_path / "s" / "study.json").read_text())
    assert [r["status"] for r in doc["runs"]] == ["missing"]


# The options of docs/study.md's example (the block after "slurm.yaml"), as a test of the sbatch file they make.
def doc_slurm_yaml() -> str:
    text = (ROOT / "docs" / "study.md").read_text()
    return re.search(r"slurm\.yaml[^\n]*\n+```yaml\n(.*?)```", text, re.S).group(1)


def fake_slurm(folder: Path, monkeypatch) -> None:
    """A stand-in sbatch on PATH that keeps the file it is given (``folder/job.sh``), and an srun (what submitit
    looks for to tell a Slurm machine)."""
    bin_dir = folder / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f"#!/bin/sh\ncp \"$1\" {folder}/job.sh\necho Submitted batch job 4242\n")
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")
    for tool in ("sbatch", "srun"):
        (bin_dir / tool).chmod(stat.S_IRWXU)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


def test_slurm_options_become_the_sbatch_file(files, tmp_path, monkeypatch):
    fake_slurm(tmp_path, monkeypatch)  # the job array submitit writes for two runs
    (tmp_path / "slurm.yaml").write_text(doc_slurm_yaml())
    launcher = make_launcher("slurm", str(tmp_path / "slurm.yaml"), 1)
    ex = launcher.executor(tmp_path / "launcher")
    cells = [Cell(f, 1, 0, make_config(files["recipe"], output=str(tmp_path / "runs" / f"{f}-b1-s0")))
             for f in ("add", "aff")]
    with ex.batch():
        jobs = [ex.submit(CellJob(c, tmp_path / f"{c.name}.log")) for c in cells]
    assert [j.job_id for j in jobs] == ["4242_0", "4242_1"]
    script = (tmp_path / "job.sh").read_text()
    for line in ("#SBATCH --partition=gpu", "#SBATCH --time=720", "#SBATCH --gpus-per-task=1",
                 "#SBATCH --cpus-per-task=8", "#SBATCH --mem=32G", "#SBATCH --array=0-1%2",  # 16 at a time, of 2
                 "#SBATCH --job-name=openaff-study", "source ~/venvs/openaff/bin/activate"):
        assert line in script.splitlines(), line


def test_bad_launcher_settings_are_one_line(files, tmp_path, capsys, monkeypatch):
    from openaff.cli import main

    common = ["study", "--fusions", "add", "--depths", "1", "--seeds", "1", "--data", files["data"], "--recipe",
              files["recipe"], "--output", str(tmp_path / "s"), "--no-progress"]
    cases = [(["--launcher", "slurm"], "--launcher slurm: no srun on this machine (run the study on a Slurm "
              "cluster's login node)"), "fake slurm from here on",
             (["--launcher", "slurm", "--launcher-config", "partition=gpu,colour=blue"],
              "--launcher-config: unknown option(s) colour for --launcher slurm; valid: "),
             (["--launcher", "slurm", "--jobs", "4"], "--jobs is for the local launchers; with --launcher slurm set "
              "array_parallelism in --launcher-config"),
             (["--launcher-config", "time=60"], "--launcher-config is for --launcher slurm or submitit-local"),
             (["--launcher", "submitit-local", "--launcher-config", "nonsense"],
              "--launcher-config must be a YAML file or KEY=VALUE,KEY=VALUE, got 'nonsense'")]
    for case in cases:
        if case == "fake slurm from here on":
            fake_slurm(tmp_path, monkeypatch)
            continue
        extra, message = case
        rc = main([*common, *extra])
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith(f"openaff study: error: {message}") and err.count("\n") == 1, (extra, err)
    assert not (tmp_path / "s").exists()  # refused before anything was made
    with pytest.raises(StudyError, match="--launcher must be one of local, submitit-local, slurm"):
        make_launcher("pbs", None, 1)
