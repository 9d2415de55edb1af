"""benchmarks/gpu_study_pilot.sh on the CPU with a tiny setting: the runs it times and the projection it prints."""

from __future__ import annotations

import csv
import json
import subprocess

from _train_utils import ROOT, env


def test_pilot_times_the_grid_and_projects_it(tmp_path):
    # One fusion type, b = 1 timed (the smallest depth always is), b = 2 past the 1-second budget: extrapolated.
    settings = dict(DEVICE="cpu", STEPS="2", VAL_STEPS="1", BATCH="8", WIDTH="0.125", SCENARIOS="short-skip",
                    FUSIONS="aff", DEPTHS="1,2", BUDGET="1", OUT=str(tmp_path / "out"), WORK=str(tmp_path / "work"))
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_study_pilot.sh")], env={**env(), **settings},
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads((tmp_path / "out" / "gpu-study-pilot.json").read_text())
    measured, guessed = doc["cells"]
    assert (measured["depth"], measured["extrapolated"], guessed["depth"], guessed["extrapolated"]) == \
        (1, False, 2, True)
    # The projection from the timed (second) epoch of the run that `openaff study` trained, by hand.
    run = tmp_path / "work" / "studies" / "short-skip" / "runs" / "aff-b1-s0"
    with (run / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2
    ips, seconds = float(rows[1]["img_per_s"]), float(rows[1]["seconds"])
    eval_per_image = max(seconds - 16 / ips, 0.0) / 8  # 2 steps of 8 images trained, 1 batch of 8 scored
    run_s = 400 * (45_000 / ips + 5_000 * eval_per_image) + 2 * 10_000 * eval_per_image
    assert abs(measured["run_s"] - run_s) < 1e-6 * run_s and measured["step_ms"] == 1000 * 8 / ips
    assert guessed["run_s"] == 2 * measured["run_s"]  # one depth measured: proportional to b
    for seeds in (3, 5):  # seeds x (b = 1 and b = 2), in hours
        assert abs(doc["gpu_hours"][str(seeds)] - seeds * 3 * run_s / 3600) < 1e-9 * run_s
    assert doc["missing"] == [] and "synthetic CIFAR-100-format" in doc["data"]
    assert doc["settings"]["limit_train"] == 16 and doc["settings"]["recipe"] == "study-gpu"
    # the run trained study-gpu's recipe, here on the CPU, batch 8, mixup on in both timed epochs
    cfg = (run / "config.yaml").read_text()
    for line in ("lr: 0.2", "mixup: 1.0", "mixup_off_epochs: 0", "batch_size: 8", "device: cpu", "amp: bf16"):
        assert line in cfg.splitlines(), line
    table = (tmp_path / "out" / "gpu-study-pilot.md").read_text()
    assert "| short-skip | aff | 2 | — | — | — |" in table and "CPU-hours of the full grid" in table
    assert table.strip() in proc.stdout
