"""benchmarks/special_paths.py: every row measures the path it names, and switching a path off changes only speed."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "special_paths.py"


def _load():
    spec = importlib.util.spec_from_file_location("special_paths", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


sp = _load()


def _tiny(case: str) -> dict:
    # The case's layout, dtype and mode at a size a test affords; aff_cifar_resnet8 stands in for the ResNet-50.
    return {**sp.CASES[case], "model": "aff_cifar_resnet8", "chans": 1 if case == "train-small" else 3,
            "extra": {"width_mult": 0.25, "num_classes": 10}, "batch": 4, "size": 16}


@pytest.mark.parametrize("case", ["eval-nchw", "eval-cl", "eval-nchw-fusions", "train-small"])
def test_each_path_is_reached_by_default_and_not_without_it(case):
    model, step, _ = sp.build_case(_tiny(case))
    names = [n for n, (_, _, cases) in sp.PATHS.items() if case in cases]
    assert names
    for name in names:
        default, off = sp.calls(name, model, step)
        # "variant": only the switched variant runs that code (opt-in recompute; the branch modules that direct
        # folding skips).
        expect = sp._TAKEN[name][2]
        assert (default > 0 and off == 0) if expect == "with" else (default == 0 and off > 0), (name, default, off)


@pytest.mark.parametrize("case,amp", [("eval-nchw", False), ("eval-cl", False), ("train-small", False),
                                      ("train-small", True)])
def test_switching_a_path_off_keeps_the_numbers(case, amp):
    # fp32 with a tight tolerance: bf16 rounding would hide a wrong formula in its noise; bf16 (the case's own
    # dtype) too, because the widened broadcast operand is taken only for 2-byte dtypes.
    spec = _tiny(case)
    model, _, _ = sp.build_case(spec)
    torch.manual_seed(1)
    x = torch.randn(4, spec["chans"], 16, 16)
    if spec["channels_last"]:
        x = x.contiguous(memory_format=torch.channels_last)

    def run():
        if not spec["train"]:
            with torch.no_grad():
                return [model(x)]
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            out = model(x)
        out.float().square().mean().backward()
        return [out, *(p.grad for p in model.parameters())]

    state = {k: v.clone() for k, v in model.state_dict().items()}
    ref = run()
    for name in [n for n, (_, _, cases) in sp.PATHS.items() if case in cases]:
        model.load_state_dict(state)  # training forward passes move the BN statistics
        with sp.path_off(name, model):
            got = run()
        assert len(got) == len(ref)
        for a, b in zip(ref, got, strict=True):
            tol = dict(rtol=5e-2, atol=5e-2) if amp else dict(rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(b.float(), a.float(), **tol, msg=name)


def test_the_command_writes_a_table_of_every_path(tmp_path):
    # One case (a child process each): the training one, whose rows also carry the saved MiB.
    out = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--cases", "train-small", "--rounds", "1",
                          "--warmup", "0", "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    doc = json.loads((tmp_path / "special-paths.json").read_text())
    rows = {(r["path"], r["case"]) for r in doc["rows"]}
    want = {(n, "train-small") for n, (_, _, cases) in sp.PATHS.items() if "train-small" in cases}
    assert rows == want
    assert doc["tiny"] and doc["command"].startswith("python benchmarks/special_paths.py --tiny")
    assert all(r["with_ms"] > 0 and r["without_ms"] > 0 and r["saved_mib_with"] > 0 for r in doc["rows"])
    md = (tmp_path / "special-paths.md").read_text()
    assert md.startswith("**Smoke test") and md.count("| train-small |") == 5


def test_unknown_case_is_refused():
    out = subprocess.run([sys.executable, str(SCRIPT), "--cases", "eval-gpu"], capture_output=True, text=True)
    assert out.returncode == 2 and "unknown case(s) eval-gpu; known: eval-nchw" in out.stderr
