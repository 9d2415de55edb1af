"""`openaff bench` end to end on the CPU with tiny models (no timing assertions)."""

import json

import pytest
import torch

from openaff import bench
from openaff.cli import COMMANDS
from openaff.errors import ConfigError

TINY = ["--device", "cpu", "--img-size", "16", "--num-classes", "10", "--batch", "2", "--warmup", "1",
        "--repeats", "1", "--iters", "1", "--threads", "1", "--cpu-alloc", "system"]
# "--cpu-alloc system": the default (retain) changes malloc for the rest of the pytest process.


@pytest.fixture(autouse=True)
def _keep_threads():
    # --threads sets the process-wide thread count; give the other tests theirs back.
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _run(tmp_path, *args):
    out = tmp_path / "res" / "bench.json"
    rc = bench.main([*TINY, *args, "--json", str(out)])
    doc = json.loads(out.read_text())
    md = out.with_suffix(".md").read_text()
    return rc, doc, md


def test_bench_command_is_registered():
    assert COMMANDS["bench"] == "openaff.bench"


def test_infer_with_folding_writes_json_and_markdown(tmp_path):
    rc, doc, md = _run(tmp_path, "--mode", "infer", "--models", "aff_cifar_resnet8,aff_cifar_resnet8+fold",
                       "--baseline", "cifar_resnet8", "--channels-last")
    assert rc == 0
    rows = {r["model"]: r for r in doc["results"]}
    # Like for like: the folded baseline is measured too, and a folded model's ratios refer to it.
    assert set(rows) == {"aff_cifar_resnet8", "aff_cifar_resnet8+fold", "cifar_resnet8", "cifar_resnet8+fold"}
    assert rows["cifar_resnet8"]["time_ratio"] == pytest.approx(1.0)
    assert rows["aff_cifar_resnet8+fold"]["baseline"] == "cifar_resnet8+fold"
    assert rows["aff_cifar_resnet8"]["baseline"] == "cifar_resnet8"
    for r in rows.values():
        assert r["error"] is None and r["ms_median"] > 0 and len(r["samples_ms"]) == 1
        assert r["params"] > 0
    assert "fuse_for_inference" in rows["aff_cifar_resnet8+fold"]["notes"]
    meta = doc["meta"]
    assert meta["mode"] == "infer" and meta["machine"]["torch"] and meta["command"].startswith("openaff bench")
    assert "--channels-last" in meta["command"] and meta["machine"]["threads"] == 1
    assert md == doc["markdown"] and "| `aff_cifar_resnet8+fold` |" in md and "| `cifar_resnet8` |" in md
    assert meta["cpu_alloc"] == "system" and "--cpu-alloc system" in meta["command"]
    assert all(r["faults_per_step"] >= 0 for r in rows.values()) and "faults/step" in md


def test_train_reports_saved_memory_and_recompute_saves_less(tmp_path):
    rc, doc, _ = _run(tmp_path, "--mode", "train", "--models",
                      "iaff_cifar_resnet8+norecompute,iaff_cifar_resnet8+recompute", "--baseline", "cifar_resnet8")
    assert rc == 0
    rows = {r["model"]: r for r in doc["results"]}
    assert all(r["saved_mib"] > 0 and r["peak_mem_mib"] is None for r in rows.values())
    assert rows["iaff_cifar_resnet8+recompute"]["saved_mib"] < rows["iaff_cifar_resnet8+norecompute"]["saved_mib"]
    assert rows["cifar_resnet8"]["saved_ratio"] == pytest.approx(1.0)


def test_model_failing_at_run_time_is_reported_not_fatal(tmp_path, monkeypatch):
    # A model that breaks while it is built or run (here: its naive rewrite) loses only its own row.
    def broken(model):
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(bench, "_make_naive", broken)
    rc, doc, md = _run(tmp_path, "--mode", "train", "--models", "cifar_resnet8+naive", "--baseline", "cifar_resnet8")
    assert rc == 1
    errors = {r["model"]: r["error"] for r in doc["results"]}
    assert "out of memory (simulated)" in errors["cifar_resnet8+naive"]
    assert errors["cifar_resnet8"] is None and "failed" in md


@pytest.mark.parametrize("args, message", [
    (["--num-classes", "0"], "--num-classes must be >= 1, got 0"),
    (["--threads", "-2"], "--threads must be >= 0, got -2"),
    (["--batch", "0"], "--batch must be >= 1"),
    (["--repeats", "0"], "--repeats must be >= 1"),
    (["--warmup", "-1"], "--warmup must be >= 0"),
    (["--img-size", "0"], "--img-size must be >= 1"),
    (["--settle", "-1"], "--settle must be >= 0"),
    (["--time-limit", "-5"], "--time-limit must be > 0"),
    (["--quiet-cpu", "1.5"], "--quiet-cpu must be"),
    (["--pair", "foo"], "--pair wants MODEL=BASELINE"),
    (["--pair", "aff_cifar_resnet8=nosuch"], "unknown model 'nosuch'"),
    (["--models", "nosuch_net"], "unknown model 'nosuch_net'"),
    (["--baseline", "nosuch_net"], "unknown model 'nosuch_net'"),
    (["--models", "cifar_resnet8+fast"], "unknown model suffix 'fast'"),
    (["--models", "resnet18:add"], "':fusion' is for openaff's models, not 'resnet18'"),
    (["--models", "aff_cifar_resnet8:nosuch"], "unknown fusion type 'nosuch'"),
    (["--models", "aff_cifar_resnet8:"], "give a fusion type after ':'"),
    (["--models", "cifar_resnet8+fold", "--mode", "train"], "+fold is for --mode infer"),
    (["--device", "mps"], "--device must be auto, cpu, cuda or cuda:N"),
    (["--device", "cuda:x"], "--device must be auto, cpu, cuda or cuda:N"),
    (["--json", "{tmp}"], "is a directory; give a file name"),
    (["--json", "{tmp}/file/x.json"], "is not a folder"),
    (["--json", "/proc/openaff-bench/x.json"], "cannot create files in /proc"),
    (["--json", "{tmp}/ok.json", "--markdown", "{tmp}"], "--markdown"),
])
def test_bad_arguments_one_line_exit_2_before_any_work(args, message, tmp_path, monkeypatch, capsys):
    (tmp_path / "file").write_text("a file, not a folder")

    def no_work(*a, **k):
        raise AssertionError("a model was built before the arguments were checked")

    monkeypatch.setattr(bench, "_Entry", no_work)
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    assert bench.main(["--models", "cifar_resnet8", "--baseline", "cifar_resnet8", *TINY[2:], *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("openaff bench: error: ") and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "ok.json").exists()


def test_cuda_without_a_gpu_is_one_line(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench.main([*TINY, "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err == "openaff bench: error: --device cuda: no CUDA GPU is available here " \
                  "(torch.cuda.is_available() is False); use --device cpu\n"


def test_bench_usage_error_is_one_line(capsys):
    with pytest.raises(SystemExit) as exit_:
        bench.main(["--batch", "many"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("openaff bench: error: argument --batch: invalid int value")


def test_pair_sets_a_second_baseline(tmp_path):
    rc, doc, md = _run(tmp_path, "--models", "aff_cifar_resnet8,iaff_cifar_resnext11_32x4d", "--baseline",
                       "cifar_resnet8", "--pair", "iaff_cifar_resnext11_32x4d=cifar_resnext11_32x4d")
    assert rc == 0
    rows = {r["model"]: r for r in doc["results"]}
    assert rows["iaff_cifar_resnext11_32x4d"]["baseline"] == "cifar_resnext11_32x4d"
    assert rows["aff_cifar_resnet8"]["baseline"] == "cifar_resnet8"
    assert "--pair iaff_cifar_resnext11_32x4d=cifar_resnext11_32x4d" in doc["meta"]["command"]


def test_naive_variant_computes_the_same():
    import timm

    from openaff.layers import AFF

    model = timm.create_model("aff_cifar_resnet8", width_mult=0.25, num_classes=10).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        want = model(x)
        assert bench._make_naive(model) == sum(isinstance(m, AFF) for m in model.modules()) > 0
        torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-6)


def test_time_limit_reports_what_was_measured(tmp_path, monkeypatch):
    # Past --time-limit no more rounds start: the rounds done so far are reported, not lost.
    clock = iter(range(0, 10**6, 10))  # every perf_counter() call advances 10 "seconds"
    monkeypatch.setattr(bench.time, "perf_counter", lambda: float(next(clock)))
    rc, doc, md = _run(tmp_path, "--models", "aff_cifar_resnet8", "--baseline", "cifar_resnet8",
                       "--repeats", "50", "--time-limit", "100")
    assert rc == 0
    meta = doc["meta"]
    assert 1 <= meta["repeats_done"] < 50 and "--time-limit 100" in meta["command"]
    assert all(len(r["samples_ms"]) == meta["repeats_done"] for r in doc["results"])
    assert f"median of {meta['repeats_done']} rounds" in md
    # A limit that passes before the first model is built: every model is reported as not run.
    rc, doc, md = _run(tmp_path, "--models", "aff_cifar_resnet8", "--baseline", "cifar_resnet8",
                       "--time-limit", "1")
    assert rc == 1 and all("--time-limit" in r["error"] for r in doc["results"])


def _load_summarize():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "summarize.py"
    spec = importlib.util.spec_from_file_location("summarize", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_summarize_judges_the_median_of_runs(tmp_path):
    # Three NCHW CPU runs of the target: 1.02, 1.10, 1.04 -> median 1.04 <= 1.06; "+naive" is not a
    # candidate; one channels_last run (1.08) is a separate setup, judged on its own.
    summarize = _load_summarize()
    paths = []
    for i, (ratio, cl) in enumerate(((1.02, False), (1.10, False), (1.04, False), (1.08, True))):
        rows = [dict(model=m, compiled=False, error=None, baseline=b, time_ratio=v,
                     time_ratio_paired=v, time_ratio_quiet=None)
                for m, b, v in (("aff_resnet50+fold", "resnet50d+fold", ratio),
                                ("aff_resnet50+naive", "resnet50d", 1.2),
                                # Folded against unfolded (what older versions wrote): not like for like, left out.
                                ("aff_resnet50+fold", "resnet50d", 0.9))]
        meta = dict(mode="infer", device="cpu", channels_last=cl, cpu_alloc="retain", amp="off", batch=8,
                    input_size=[3, 224, 224], machine=dict(threads=2))
        paths.append(tmp_path / f"run{i}.json")
        paths[-1].write_text(json.dumps(dict(meta=meta, results=rows)))
    # A smoke test (batch 2) is not evidence for the target: left out.
    smoke = dict(mode="infer", device="cpu", channels_last=False, amp="off", batch=2, input_size=[3, 64, 64],
                 machine=dict(threads=2))
    paths.append(tmp_path / "smoke.json")
    paths[-1].write_text(json.dumps(dict(meta=smoke, results=[dict(
        model="aff_resnet50+fold", compiled=False, error=None, baseline="resnet50d+fold", time_ratio=2.0,
        time_ratio_paired=2.0, time_ratio_quiet=None)])))
    table = summarize.summarize([str(p) for p in paths])
    rows = [line for line in table.splitlines() if "median of all rounds" in line]
    assert len(rows) == 2
    assert "`aff_resnet50+fold` | NCHW, alloc retain | 1.040 | 3: 1.020–1.100 | `resnet50d+fold` | yes |" in rows[0]
    assert "`aff_resnet50+fold` | channels_last, alloc retain | 1.080 | 1 | `resnet50d+fold` | **no** |" in rows[1]
    assert "0.900" not in table
    assert "naive" not in table
    assert "undisturbed rounds (<= 1.06) | – | | not measured" in table  # no quiet numbers given
    assert "eager (>= 0.85) | – | | not measured" in table


def test_fusion_spec_builds_the_twin(tmp_path):
    # `name:fusion`: one of our models with another fusion type, e.g. the add-twin beside its baseline.
    rc, doc, md = _run(tmp_path, "--mode", "infer", "--models", "aff_cifar_resnet8:add,aff_cifar_resnet8:ms_se+fold",
                       "--baseline", "cifar_resnet8")
    assert rc == 0
    rows = {r["model"]: r for r in doc["results"]}
    assert all(r["error"] is None for r in rows.values())
    # The add-twin is the plain network: the same parameter count and multiply-adds.
    assert rows["aff_cifar_resnet8:add"]["params"] == rows["cifar_resnet8"]["params"]
    assert rows["aff_cifar_resnet8:add"]["gmacs"] == pytest.approx(rows["cifar_resnet8"]["gmacs"])
    assert rows["aff_cifar_resnet8:ms_se+fold"]["params"] > rows["cifar_resnet8"]["params"]
    assert "| `aff_cifar_resnet8:add` |" in md


def test_python_api_takes_typed_settings_and_leaves_them_alone(tmp_path):
    settings = bench.BenchSettings(models=("aff_cifar_resnet8",), baseline="cifar_resnet8", device="cpu", img_size=16,
                                   num_classes=10, batch=2, warmup=1, repeats=1, iters=1, threads=1,
                                   cpu_alloc="system")
    before = repr(settings)
    doc = bench.run_bench(settings)
    assert repr(settings) == before  # not filled in or mutated
    assert {r["model"] for r in doc["results"]} == {"aff_cifar_resnet8", "cifar_resnet8"}
    assert all(r["error"] is None for r in doc["results"]) and doc["meta"]["batch"] == 2
    # The recorded command is the CLI's for the same settings: running it gives the same setup.
    assert doc["meta"]["command"] == settings.command_line()
    rc, cli_doc, _ = _run(tmp_path, *doc["meta"]["command"].split()[2:])
    assert rc == 0 and cli_doc["meta"]["command"] == settings.command_line(tmp_path / "res" / "bench.json")
    with pytest.raises(ConfigError, match="--mode must be one of train, infer, got 'fit'"):
        bench.run_bench(settings, mode="fit")
    with pytest.raises(ConfigError, match="run_bench: .*'batches'"):
        bench.run_bench(settings, batches=3)
    assert bench.BenchSettings(mode="train").resolved().models == bench.DEFAULT_MODELS["train"]
