"""``openaff study``: the grid of runs, its aggregation, resuming, refusals, and --jobs."""

from __future__ import annotations

import contextlib
import csv
import json
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch
import yaml
from _train_utils import env, run_cli, write_cifar, write_fashion_mnist

import openaff.study as study
import openaff.study.grid as study_grid  # run_study trains through study_grid.train
import openaff.training.train as train_mod
from openaff.layers import fusion_names
from openaff.study import StudyError, paper_number, run_study, summarize

# A recipe that learns something in the 16 steps of one epoch on 256 images (the shipped ones take minutes).
TINY_RECIPE = dict(model="cifar_resnet8", model_kwargs=dict(width_mult=0.125), data="fashion-mnist", epochs=1,
                   batch_size=16, lr=0.1, weight_decay=5e-4, sched="cosine", label_smoothing=0.1, aug="crop-flip",
                   crop_padding=2, amp="bf16", channels_last=True, workers=0)
TINY = dict(limit_train=256, limit_val=128, threads=1, progress=False)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("study-data")
    recipe = root / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(TINY_RECIPE))
    return dict(data=f"fashion-mnist:{write_fashion_mnist(root / 'fm', n_train=256, n_test=128)}",
                recipe=str(recipe), root=root)


@pytest.fixture(scope="module")
def grid(files, tmp_path_factory) -> study.StudyResult:
    """2 fusion types x 1 depth x 2 seeds, one after the other in this process."""
    out = tmp_path_factory.mktemp("study") / "s"
    return run_study(out, fusions="add,aff", depths="1", seeds=2, data=files["data"], recipe=files["recipe"], **TINY)


def metrics(folder: str | Path) -> list[dict]:
    with (Path(folder) / "metrics.csv").open() as f:
        return list(csv.DictReader(f))




def test_table_is_mean_and_std_over_the_runs_metrics(grid):
    out = grid.output
    doc = json.loads((out / "study.json").read_text())
    assert len(doc["runs"]) == 4 and {r["status"] for r in doc["runs"]} == {"finished"}
    md = (out / "table.md").read_text()
    means = {}
    for fusion in ("add", "aff"):
        runs = [r for r in doc["runs"] if r["fusion"] == fusion]
        assert sorted(r["seed"] for r in runs) == [0, 1]
        rows = [metrics(r["folder"]) for r in runs]
        best = [max(float(x["val_top1"]) for x in rs) for rs in rows]
        final = [float(rs[-1]["val_top1"]) for rs in rows]
        assert [r["best"] for r in runs] == best and [r["final"] for r in runs] == final
        cell = next(c for c in doc["cells"] if c["fusion"] == fusion and c["depth"] == 1)
        assert cell["best_mean"] == pytest.approx(statistics.fmean(best), abs=1e-12)
        assert cell["best_std"] == pytest.approx(statistics.stdev(best), abs=1e-12)
        assert cell["final_mean"] == pytest.approx(statistics.fmean(final), abs=1e-12)
        means[fusion] = text = f"{statistics.fmean(best):.2f} ± {statistics.stdev(best):.2f}"
        assert re.search(rf"^\| {fusion} \| (\*\*)?{re.escape(text)}(\*\*)? \|$", md, re.M), md
        # every cell is an ordinary run folder whose weights rebuild with timm
        for r in runs:
            folder = Path(r["folder"])
            assert folder.parent == out / "runs" and folder.name == f"{fusion}-b1-s{r['seed']}"
            assert {"config.json", "model.safetensors", "metrics.csv", "last.pt", "config.yaml"} <= \
                {p.name for p in folder.iterdir()}
            cfg = yaml.safe_load((folder / "config.yaml").read_text())
            assert (cfg["model"], cfg["model_kwargs"], cfg["seed"]) == \
                ("cifar_resnet8", dict(width_mult=0.125, fusion=fusion, b=1), r["seed"])
        model = timm.create_model(f"local-dir:{runs[0]['folder']}", pretrained=True)
        assert cell["params"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    cells = {c["fusion"]: c for c in doc["cells"]}
    assert cells["aff"]["params"] > cells["add"]["params"]
    winner = max(cells, key=lambda f: cells[f]["best_mean"])
    assert f"| {winner} | **{means[winner]}** |" in md  # the best of the column in bold
    # the paper's number, in its own labelled table: Table 4, short skip, b = 1
    paper = md[md.index("## The paper's numbers"):]
    assert "CIFAR-100 with its 20 coarse labels" in paper and "not comparable" in md
    assert "| add | 74.0 |" in paper and "| aff | 76.3 |" in paper
    assert (cells["add"]["paper"], cells["add"]["paper_table"]) == (0.740, 4)
    assert (out / "study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with (out / "results.csv").open() as f:
        assert [(r["fusion"], r["seed"], float(r["best"])) for r in csv.DictReader(f)] == \
            [(r["fusion"], str(r["seed"]), r["best"]) for r in doc["runs"]]


def test_rerun_trains_nothing_and_summarize_reaggregates(grid, files, monkeypatch):
    out = grid.output
    stamps = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*") if p.is_file()}

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(study_grid, "train", no_training)
    again = run_study(out, fusions="add,aff", depths="1", seeds=2, data=files["data"], recipe=files["recipe"], **TINY)
    assert again.trained == [] and again.cells == grid.cells
    assert {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*") if p.is_file()} == stamps
    (out / "table.md").unlink()
    (out / "study.png").unlink()
    result = summarize(out, progress=False)
    assert result.cells == grid.cells and (out / "table.md").is_file() and (out / "study.png").is_file()


def test_interrupted_run_is_resumed_exactly(files, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    real_epoch = train_mod.train_one_epoch

    def stop_in_epoch_2(state, *args, **kwargs):
        if state.epoch == 1:
            raise KeyboardInterrupt
        return real_epoch(state, *args, **kwargs)

    monkeypatch.setattr(train_mod, "train_one_epoch", stop_in_epoch_2)
    args = dict(fusions="aff", depths="1", seeds=1, data=files["data"], recipe=files["recipe"], epochs=2, **TINY)
    with pytest.raises(KeyboardInterrupt) as info:
        run_study(**args)  # the default output: a fresh runs/study-<scenario>-<data>-<time>
    (out,) = (tmp_path / "runs").iterdir()
    assert re.fullmatch(r"study-short-skip-fashion-mnist-\d{8}-\d{6}", out.name)
    note = info.value.__notes__[-1]
    assert note.startswith("interrupted after 0 of 1 runs; continue with: openaff study ") and \
        note.endswith(f"--output runs/{out.name}")
    cell = out / "runs" / "aff-b1-s0"
    assert len(metrics(cell)) == 1 and (cell / "last.pt").is_file()
    monkeypatch.setattr(train_mod, "train_one_epoch", real_epoch)
    calls = []
    real_train = study_grid.train

    def spy(cfg, **kwargs):
        calls.append(kwargs)
        return real_train(cfg, **kwargs)

    monkeypatch.setattr(study_grid, "train", spy)
    result = run_study(f"runs/{out.name}", **args)
    assert calls == [dict(resume=Path(f"runs/{out.name}/runs/aff-b1-s0"))] and result.trained == ["aff-b1-s0"]
    straight = run_study(tmp_path / "straight", **args)
    columns = ("epoch", "train_loss", "val_loss", "val_top1", "val_top5")
    assert [[r[k] for k in columns] for r in metrics(cell)] == \
        [[r[k] for k in columns] for r in metrics(straight.runs[0].folder)]
    assert len(calls) == 2 and calls[1] == dict(overwrite=False)


def test_changed_configuration_is_refused(grid, files, tmp_path, monkeypatch):
    monkeypatch.setattr(study_grid, "train", None)  # nothing may train
    common = dict(fusions="add,aff", depths="1", seeds=2, data=files["data"], recipe=files["recipe"], **TINY)
    with pytest.raises(StudyError, match=r"holds a study with epochs=1, not 2; only fusion types, depths and seeds"):
        run_study(grid.output, **{**common, "epochs": 2})
    copy = tmp_path / "copy"
    shutil.copytree(grid.output, copy)
    cell_cfg = copy / "runs" / "aff-b1-s1" / "config.yaml"
    cfg = yaml.safe_load(cell_cfg.read_text())
    cell_cfg.write_text(yaml.safe_dump({**cfg, "lr": 0.07}))
    with pytest.raises(StudyError, match=r"aff-b1-s1 was trained with lr=0.07, this study asks for 0.1"):
        run_study(copy, **common)


def test_jobs_2_gives_the_numbers_of_jobs_1(grid, files, tmp_path):
    result = run_study(tmp_path / "j2", fusions="add,aff", depths="1", seeds=1, data=files["data"],
                       recipe=files["recipe"], jobs=2, **TINY)
    assert sorted(result.trained) == ["add-b1-s0", "aff-b1-s0"]
    columns = ("epoch", "train_loss", "val_loss", "val_top1", "val_top5")
    for fusion in ("add", "aff"):
        ours = metrics(tmp_path / "j2" / "runs" / f"{fusion}-b1-s0")
        theirs = metrics(grid.output / "runs" / f"{fusion}-b1-s0")
        assert [[r[k] for k in columns] for r in ours] == [[r[k] for k in columns] for r in theirs]
        assert (tmp_path / "j2" / "logs" / f"{fusion}-b1-s0.log").read_text().count("epoch 1/1") == 1


def test_bad_input_is_one_line_exit_2(files, tmp_path, capsys):
    not_cifar = tmp_path / "not-cifar"
    not_cifar.mkdir()
    (not_cifar / "readme.txt").write_text("hello")
    out = tmp_path / "never"
    base = ["study", "--recipe", files["recipe"], "--data", files["data"], "--output", str(out), "--no-progress"]
    for argv, message in (
            (["--fusions", "add,nope"], "unknown fusion type(s) nope in --fusions; this openaff has "
                                        + ", ".join(fusion_names())),
            (["--scenario", "middle"], "unknown scenario 'middle'; choose one of same-layer, short-skip, long-skip"),
            (["--scenario", "long-skip"], "scenario long-skip trains on fashion-mnist-scenes; not 'fashion-mnist'"),
            (["--table", "5"], "argument --table: invalid choice: 5"),
            (["--table", "4", "--fusions", "add"], "give --fusions or --table"),
            (["--depths", "0"], "--depths: '0' is not valid"),
            (["--depths", "1,x"], "--depths: 'x' is not valid"),
            (["--depths", "1,,2"], "--depths must be a comma-separated list"),
            (["--seeds", "0"], "argument --seeds: must be > 0"),
            (["--family", "vgg"], "scenario short-skip has no model family 'vgg'; choose one of resnet, resnext"),
            (["--data", "cifar10"], "--data cifar10 needs the folder of the CIFAR python batches"),
            (["--data", "mnist"], "--data must be fashion-mnist, fashion-mnist-scenes, cifar10:DIR or cifar100:DIR"),
            (["--data", f"cifar100:{not_cifar}"], "no cifar100 python batches"),
            (["--recipe", "no-such-recipe"], "unknown recipe 'no-such-recipe'"),
            (["--summarize", str(tmp_path)], "--summarize re-aggregates a study as it was run; drop")):
        rc, stdout, err = run_cli([*base, *argv], capsys)
        assert rc == 2 and err.startswith("openaff study: error: ") and err.count("\n") == 1, (argv, err)
        assert message in err and "Traceback" not in err and stdout == "", (argv, err)
    rc, _, err = run_cli(["study", "--summarize", str(tmp_path)], capsys)
    assert (rc, err) == (2, f"openaff study: error: {tmp_path} holds no study (no study.json)\n")
    assert not out.exists()  # nothing was created by a refused study


def test_same_layer_uses_the_inception_family_and_a_missing_family_is_one_line(files, tmp_path, monkeypatch,
                                                                               capsys):
    seen = []

    def stop(cfg, **kwargs):
        seen.append(cfg)
        raise StudyError("stopped by the test")

    monkeypatch.setattr(study_grid, "train", stop)
    argv = ["study", "--scenario", "same-layer", "--fusions", "aff", "--depths", "2", "--seeds", "1", "--recipe",
            files["recipe"], "--data", files["data"], "--output", str(tmp_path / "s"), "--no-progress"]
    rc, _, err = run_cli(argv, capsys)
    assert rc == 2 and err.count("\n") == 1 and "run aff-b2-s0 failed: stopped by the test" in err
    assert (seen[0].model, seen[0].model_kwargs) == ("cifar_inception_resnet14", dict(width_mult=0.125, fusion="aff",
                                                                                     b=2))
    # a scenario whose model family is not registered (as same-layer was before its family landed)
    missing = study.Scenario("same-layer", "test", families={"resnet": study.Family("no_such_net{depth}", 6, 2, "X")})
    monkeypatch.setitem(study.SCENARIOS, "same-layer", missing)
    argv[argv.index("--output") + 1] = str(tmp_path / "never")
    rc, _, err = run_cli(argv, capsys)
    assert (rc, err) == (2, "openaff study: error: scenario same-layer: model family not available (no timm model "
                            "no_such_net* is registered in this version of openaff)\n")
    assert len(seen) == 1 and not (tmp_path / "never").exists()


def test_scenario_models_and_paper_numbers():
    short = study.SCENARIOS["short-skip"]
    assert short.model("ms_se", 5) == ("cifar_resnet32", dict(fusion="ms_se", b=5))
    name, kwargs = short.model("aff", 4)  # no ResNet-26 is registered: another member with b=4
    assert name in timm.list_models("cifar_resnet*") and kwargs == dict(fusion="aff", b=4)
    with torch.device("meta"):
        assert len(timm.create_model(name, **kwargs).layer1) == 4
    assert short.model("iaff", 4, "resnext") == ("cifar_resnext38_32x4d", dict(fusion="iaff", b=4))
    assert short.metric == "val_top1" and study.SCENARIOS["long-skip"].metric == "val_miou"
    assert paper_number("aff", "short-skip", 1) == (0.763, 4)
    assert paper_number("aff", "short-skip", 1, table=6) == (0.764, 6)  # Table 6's AFF row differs
    assert paper_number("iaff", "short-skip", 4) == (None, 4)
    assert paper_number("aff_local_local", "same-layer", 4) == (0.787, 3)
    assert paper_number("half_aff", "same-layer", 1) == (None, None)


def test_cifar100_defaults_to_coarse_labels(tmp_path, monkeypatch):
    write_cifar(tmp_path / "c100", "cifar100", n_train=64, n_test=32)
    seen = []

    def stop(cfg, **kwargs):
        seen.append(cfg)
        raise StudyError("stopped by the test")

    monkeypatch.setattr(study_grid, "train", stop)
    with pytest.raises(StudyError, match="stopped by the test"):
        run_study(tmp_path / "s", fusions="add", depths="1", seeds=1, data=f"cifar100:{tmp_path / 'c100'}",
                  recipe="study-cpu", width_mult=0.125, progress=False)
    assert (seen[0].data, seen[0].cifar100_labels, seen[0].data_dir) == ("cifar100", "coarse", str(tmp_path / "c100"))
    doc = json.loads((tmp_path / "s" / "study.json").read_text())
    assert doc["runs"][0]["params"] == sum(p.numel() for p in timm.create_model(
        "cifar_resnet8", num_classes=20, width_mult=0.125, fusion="add").parameters() if p.requires_grad)


def test_study_killed_outright_takes_its_runs_along_and_resumes(files, tmp_path, monkeypatch):
    data = write_fashion_mnist(tmp_path / "fm", n_train=512, n_test=64)  # 32 steps an epoch: time to kill
    out = tmp_path / "s"
    argv = ["study", "--fusions", "aff", "--depths", "1", "--seeds", "1", "--data", f"fashion-mnist:{data}",
            "--recipe", files["recipe"], "--epochs", "2", "--limit-val", "64", "--jobs", "2", "--output", str(out),
            "--no-progress"]
    proc = subprocess.Popen([sys.executable, "-m", "openaff", *argv], env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    cell = out / "runs" / "aff-b1-s0"
    try:
        deadline = time.monotonic() + 240
        while not (cell / "metrics.csv").is_file():  # the first epoch's checkpoint and row are written
            assert proc.poll() is None and time.monotonic() < deadline, "the study ended before its first epoch"
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()

    def runs_left() -> list[int]:  # the run process: its command line names the study's recipe file
        pids = []
        for d in Path("/proc").iterdir():
            with contextlib.suppress(OSError):
                if d.name.isdigit() and str(out).encode() in (d / "cmdline").read_bytes():
                    pids.append(int(d.name))
        return pids

    deadline = time.monotonic() + 30
    while runs_left() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert runs_left() == []  # the parent-death signal stopped it
    first = metrics(cell)
    assert len(first) == 1 and (cell / "last.pt").is_file()
    calls = []
    real_train = study_grid.train
    monkeypatch.setattr(study_grid, "train", lambda cfg, **kw: calls.append(kw) or real_train(cfg, **kw))
    run_study(out, fusions="aff", depths="1", seeds=1, data=f"fashion-mnist:{data}", recipe=files["recipe"],
              epochs=2, limit_val=64, threads=1, progress=False)
    assert calls == [dict(resume=cell)]
    rows = metrics(cell)
    assert len(rows) == 2 and rows[0] == first[0]
