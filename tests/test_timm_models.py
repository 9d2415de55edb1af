"""timm's own model tests on our models: its ``tests/test_models.py``, every marker, run as timm runs it.

``make install`` puts the ``tests`` folder (and ``pyproject.toml``, for timm's markers) of the installed timm's
sdist in ``.venv/timm-tests``. Here that file runs in a pytest of its own, with our models registered before it
is collected (``tests/_timm_models_plugin.py``), restricted to our model names by timm's own selection: every
test timm parametrizes over its ``list_models(...)`` filters, for our names. Nothing of timm's file is changed;
it must pass with no failure, error or skip, and every one of its per-model tests must have run on every
model asked for.

The default run takes one member of each model class and fusion type (the ImageNet ResNeXt with iAFF at timm's
input sizes, the small-image families at 32x32); ``-m slow`` runs every registered model.
"""

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import timm

from openaff.catalog import list_openaff_models

TESTS = Path(__file__).resolve().parent
TIMM_TESTS = Path(os.environ.get("OPENAFF_TIMM_TESTS", Path(sys.prefix) / "timm-tests"))
# timm's tests that take a model_name from list_models(), i.e. run on every registered model of ours.
PER_MODEL = {"test_model_forward", "test_model_backward", "test_model_default_cfgs", "test_model_forward_features",
             "test_model_forward_torchscript", "test_model_forward_fx", "test_model_backward_fx",
             "test_model_forward_fx_torchscript"}
QUICK = ("iaff_resnext50_32x4d", "aff_cifar_resnet8", "cifar_resnet8", "iaff_cifar_resnext11_32x4d",
         "aff_cifar_inception_resnet8")


def _timm_tests() -> Path:
    test_file = TIMM_TESTS / "tests" / "test_models.py"
    if not test_file.is_file():
        pytest.skip(f"timm's tests are not in {TIMM_TESTS} (make install fetches them from timm's sdist)")
    version = next((line.split(":", 1)[1].strip() for line in (TIMM_TESTS / "PKG-INFO").read_text().splitlines()
                    if line.startswith("Version:")), None)
    assert version == timm.__version__, f"{TIMM_TESTS} holds timm {version}'s tests, timm {timm.__version__} is " \
                                        "installed: run make install"
    return test_file


def _run_timm_tests(models: tuple[str, ...], tmp_path: Path) -> None:
    test_file = _timm_tests()
    report = tmp_path / "timm.xml"
    env = {**os.environ, "OPENAFF_TIMM_MODELS": ",".join(models), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(TESTS), *filter(None, [os.environ.get("PYTHONPATH")])])}
    env.pop("GITHUB_ACTIONS", None)  # timm's full selection, not its reduced one for GitHub's runners
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "_timm_models_plugin", "-p", "no:cacheprovider",
           "-c", str(TIMM_TESTS / "pyproject.toml"), "--rootdir", str(TIMM_TESTS), f"--junitxml={report}",
           str(test_file)]
    proc = subprocess.run(cmd, cwd=TIMM_TESTS, env=env, capture_output=True, text=True, timeout=1800)
    tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-40:])
    assert proc.returncode == 0, tail
    suite = ET.parse(report).getroot().find("testsuite")
    assert (int(suite.get("failures")), int(suite.get("errors")), int(suite.get("skipped"))) == (0, 0, 0), tail
    ran = {(case.get("name").split("[")[0], case.get("name").split("[")[1].rstrip("]").split("-")[-1].split(".")[0])
           for case in suite.iter("testcase")}
    assert {(test, model) for test in PER_MODEL for model in models} <= ran, tail


def test_timm_model_tests_pass(tmp_path):
    _run_timm_tests(QUICK, tmp_path)


@pytest.mark.slow
def test_timm_model_tests_pass_for_every_model(tmp_path):
    _run_timm_tests(tuple(list_openaff_models()), tmp_path)
