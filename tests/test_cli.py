"""The ``openaff`` front end: every wrong configuration value is one line and exit status 2, whether it
comes from a flag or a recipe; valid values pass and ``--print-config`` is itself a recipe; ``--version``;
one exit-status convention for all commands.

The property tests hold their own table of what each field accepts (below), written from the
documented rules rather than read from the config's metadata, and check that it covers every field.
"""

from __future__ import annotations

import math
import re
import string
import subprocess
import sys
import tempfile
from dataclasses import dataclass, fields
from pathlib import Path

import pytest
import yaml
from _train_utils import run_cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from timm.optim import list_optimizers

import openaff
from openaff.training import ConfigError, TrainConfig, make_config
from openaff.training.config import dump_yaml, to_yaml

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Rule:
    """What one field accepts: ``kind`` int/float/bool/choice/name/str/kwargs/milestones."""

    kind: str
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    optional: bool = False
    choices: tuple[str, ...] = ()
    valid: tuple = ()  # examples of valid values (name fields)


def _int(lo, hi=None, optional=False):
    return Rule("int", lo, hi, optional=optional)


def _float(lo, hi=None, lo_open=False, hi_open=False, optional=False):
    return Rule("float", lo, hi, lo_open, hi_open, optional)


RULES: dict[str, Rule] = {
    "model": Rule("name", valid=("aff_cifar_resnet8", "iaff_cifar_resnext11_32x4d", "resnet18", "resnet50d")),
    "model_kwargs": Rule("kwargs"),
    "sync_bn": Rule("bool"),
    "data": Rule("str"),
    "data_dir": Rule("str", optional=True),
    "cifar100_labels": Rule("choice", choices=("fine", "coarse")),
    "limit_train": _int(1, optional=True),
    "limit_val": _int(1, optional=True),
    "holdout": _int(0, optional=True),
    "limit_test": _int(1, optional=True),
    "skip_corrupt": Rule("bool"),
    "workers": _int(0, optional=True),
    "img_size": _int(1, optional=True),
    "crop_pct": _float(0, 1, lo_open=True),
    "aug": Rule("choice", choices=("none", "crop-flip", "imagenet")),
    "crop_padding": _int(0),
    "hflip": _float(0, 1),
    "auto_augment": Rule("name", optional=True, valid=("original", "v0r", "3a", "original-mstd0.5",
                                                       "rand-m9-mstd0.5", "rand-m7-n3-inc1", "augmix-m5-w4-d2")),
    "color_jitter": _float(0),
    "pca_lighting": _float(0),
    "random_erasing": _float(0, 1),
    "mixup": _float(0),
    "cutmix": _float(0),
    "mixup_off_epochs": _int(0),
    "label_smoothing": _float(0, 1, hi_open=True),
    "epochs": _int(1),
    "batch_size": _int(1),
    "opt": Rule("name", valid=tuple(list_optimizers()) + ("lookahead_adamw", "SGD")),
    "lr": _float(0, lo_open=True, optional=True),
    "lr_base": _float(0, lo_open=True),
    "lr_base_size": _int(1),
    "momentum": _float(0, 1, lo_open=True, hi_open=True),  # 0 is refused with Nesterov SGD (the default opt)
    "weight_decay": _float(0),
    "sched": Rule("name", valid=("cosine", "tanh", "poly", "multistep", "step", "constant", "wsd", "rsqrt")),
    "warmup_epochs": _float(0),
    "warmup_lr": _float(0),
    "min_lr": _float(0),
    "decay_milestones": Rule("milestones"),
    "decay_rate": _float(0, lo_open=True),
    "grad_clip": _float(0, lo_open=True, optional=True),
    "ema_decay": _float(0, 1, hi_open=True),
    "amp": Rule("choice", choices=("none", "bf16", "fp16")),
    "channels_last": Rule("bool"),
    "compile": Rule("bool"),
    "threads": _int(1, optional=True),
    "cpu_alloc": Rule("choice", choices=("retain", "system")),
    "device": Rule("choice", choices=("auto", "cpu", "cuda")),
    "seed": _int(0, 2**32 - 1),
    "deterministic": Rule("bool"),
    "output": Rule("str", optional=True),
    "checkpoint_every": _int(0),
    "progress": Rule("bool"),
    "recipe": Rule("str", optional=True),
}
FLAG_FIELDS = sorted(set(RULES) - {"recipe"})  # recipe is --recipe, which loads one


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def test_rules_cover_every_field():
    assert set(RULES) == {f.name for f in fields(TrainConfig)}


# --- strategies ---------------------------------------------------------------------------------

WORDS = st.text(alphabet=string.ascii_letters, min_size=1, max_size=12).filter(
    lambda w: w.lower() not in ("none", "null"))  # an optional field's "unset"
JUNK = st.sampled_from([[], [1, 2], {"a": 1}, {}])
FINITE = st.floats(allow_nan=False, allow_infinity=False)


def _out_of_range(rule: Rule) -> st.SearchStrategy:
    parts = []
    if rule.kind == "int":
        parts.append(st.integers(max_value=int(rule.lo) - 1))
        if rule.hi is not None:
            parts.append(st.integers(min_value=int(rule.hi) + 1))
    else:
        below = FINITE.filter(lambda x: x <= rule.lo if rule.lo_open else x < rule.lo)
        parts.append(below)
        if rule.hi is not None:
            parts.append(FINITE.filter(lambda x: x >= rule.hi if rule.hi_open else x > rule.hi))
    return st.one_of(parts)


def wrong_value(rule: Rule) -> st.SearchStrategy:
    """Python values (as a recipe's YAML gives them) that the field must refuse."""
    no_none = [] if rule.optional else [st.none()]
    if rule.kind == "int":
        return st.one_of(WORDS, st.booleans(), JUNK, _out_of_range(rule),
                         FINITE.filter(lambda x: not x.is_integer()),
                         st.integers(min_value=1, max_value=999).map(str), *no_none)
    if rule.kind == "float":
        return st.one_of(WORDS, st.booleans(), JUNK, _out_of_range(rule),
                         st.sampled_from([math.nan, math.inf, -math.inf]), st.just("0.5"), *no_none)
    if rule.kind == "bool":
        return st.one_of(st.sampled_from(["no", "yes", "true", "false", "on", "off", "0", "1"]), WORDS,
                         st.integers(), JUNK, st.none())
    if rule.kind == "choice":
        return st.one_of(WORDS.filter(lambda w: w not in rule.choices), st.just(""), st.integers(), JUNK, st.none())
    if rule.kind == "name":
        return st.one_of(WORDS.map(lambda w: "zz" + w), st.just(""), st.integers(), JUNK, *no_none)
    if rule.kind == "str":
        return st.one_of(st.just(""), st.integers(), FINITE, JUNK.filter(bool), *no_none)
    if rule.kind == "kwargs":
        return st.one_of(WORDS, st.integers(), st.lists(st.integers(), max_size=3),
                         st.builds(lambda v: {"width_mult": v}, FINITE.filter(lambda x: x <= 0)),
                         st.builds(lambda v: {"drop_path_rate": v}, FINITE.filter(lambda x: x >= 1)),
                         st.just({"width_mult": "wide"}), st.just({1: 2}))
    if rule.kind == "milestones":
        pairs = st.tuples(st.integers(1, 500), st.integers(1, 500)).filter(lambda p: p[0] >= p[1])
        return st.one_of(st.integers(), WORDS, pairs.map(list), st.lists(WORDS, min_size=1, max_size=3),
                         st.lists(st.integers(max_value=0), min_size=1, max_size=3), st.just([1.5]))
    raise AssertionError(rule.kind)


def wrong_flag(name: str, rule: Rule) -> st.SearchStrategy:
    """Command-line pieces that set field ``name`` to something it must refuse."""
    f = flag(name)
    if rule.kind in ("int", "float"):
        text = st.one_of(WORDS, _out_of_range(rule).map(str))
        if rule.kind == "int":
            text = st.one_of(text, FINITE.filter(lambda x: not x.is_integer()).map(str))
        else:
            text = st.one_of(text, st.sampled_from(["nan", "inf", "-inf"]))
        return text.map(lambda t: [f"{f}={t}"])
    if rule.kind == "bool":  # a boolean flag takes no value
        return st.tuples(st.sampled_from([f, f"--no-{f[2:]}"]), st.sampled_from(["no", "yes", "1", "x"])).map(
            lambda p: [f"{p[0]}={p[1]}"])
    if rule.kind == "choice":
        return st.one_of(WORDS.filter(lambda w: w not in rule.choices), st.just("")).map(lambda t: [f"{f}={t}"])
    if rule.kind == "name":
        return st.one_of(WORDS.map(lambda w: "zz" + w), st.just("")).map(lambda t: [f"{f}={t}"])
    if rule.kind == "str":
        return st.just([f"{f}="])
    if rule.kind == "kwargs":
        return st.one_of(WORDS.map(lambda w: [f, w]),
                         FINITE.filter(lambda x: x <= 0).map(lambda v: [f, f"width_mult={v}"]),
                         FINITE.filter(lambda x: x >= 1).map(lambda v: [f, f"drop_path_rate={v}"]))
    if rule.kind == "milestones":
        pairs = st.tuples(st.integers(1, 500), st.integers(1, 500)).filter(lambda p: p[0] >= p[1])
        return st.one_of(WORDS.map(lambda w: [f, w]), pairs.map(lambda p: [f, str(p[0]), str(p[1])]),
                         st.integers(-5, 0).map(lambda v: [f, str(v)]), st.just([f, "1.5"]))
    raise AssertionError(rule.kind)


def valid_value(rule: Rule) -> st.SearchStrategy:
    """Python values the field must accept (``None`` included where the field is optional)."""
    none = [st.none()] if rule.optional else []
    if rule.kind == "int":
        return st.one_of(st.integers(int(rule.lo), int(rule.hi) if rule.hi is not None else 10**6), *none)
    if rule.kind == "float":
        lo, hi = rule.lo, 1e6 if rule.hi is None else rule.hi
        return st.one_of(st.floats(lo, hi, exclude_min=rule.lo_open, exclude_max=rule.hi_open), *none)
    if rule.kind == "bool":
        return st.booleans()
    if rule.kind == "choice":
        return st.sampled_from(rule.choices)
    if rule.kind == "name":
        return st.one_of(st.sampled_from(rule.valid), *none)
    if rule.kind == "str":
        word = st.text(alphabet=string.ascii_letters + string.digits + "_./", min_size=1, max_size=12)
        return st.one_of(word.filter(lambda w: w.lower() not in ("none", "null")), *none)
    if rule.kind == "kwargs":
        return st.fixed_dictionaries({}, optional={"width_mult": st.floats(0.05, 4),
                                                   "drop_path_rate": st.floats(0, 0.9), "drop_rate": st.floats(0, 0.9)})
    if rule.kind == "milestones":
        return st.lists(st.integers(1, 1000), max_size=4, unique=True).map(sorted)
    raise AssertionError(rule.kind)


# --- helpers ------------------------------------------------------------------------------------



def assert_one_line_error(rc: int, out: str, err: str, prefix: str) -> None:
    assert rc == 2, (rc, err)
    assert err.startswith(prefix) and err.endswith("\n") and err.count("\n") == 1, err
    assert "Traceback" not in err and "usage:" not in err and out == "", err


def write_recipe(mapping: dict) -> str:
    fd, path = tempfile.mkstemp(suffix=".yaml")
    with open(fd, "w") as f:
        f.write(dump_yaml(mapping))
    return path


PROPERTY = settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


# --- wrong values: one line, exit status 2 --------------------------------------------------------

@pytest.mark.parametrize("name", FLAG_FIELDS)
@PROPERTY
@given(data=st.data())
def test_wrong_flag_value_is_one_line_exit_2(name, data, capsys):
    argv = data.draw(wrong_flag(name, RULES[name]), label="flag")
    rc, out, err = run_cli(["train", "--print-config", *argv], capsys)
    assert_one_line_error(rc, out, err, f"openaff train: error: argument {flag(name)}")


@pytest.mark.parametrize("name", sorted(RULES))
@PROPERTY
@given(data=st.data())
def test_wrong_recipe_value_is_one_line_exit_2(name, data, capsys):
    value = data.draw(wrong_value(RULES[name]), label="value")
    path = write_recipe({name: value})
    try:
        with pytest.raises(ConfigError) as err:
            make_config(path)
        text = str(err.value)
        assert text.startswith(f"recipe {path}: {name}") and "\n" not in text, text
        if name != "recipe":  # `--recipe PATH` records PATH as the recipe, whatever the file says
            rc, out, err = run_cli(["train", "--print-config", "--recipe", path], capsys)
            assert_one_line_error(rc, out, err, f"openaff train: error: recipe {path}: {name}")
    finally:
        Path(path).unlink()


# The issue's examples, each with what it now says.
ISSUE_RECIPES = [
    ("epochs: abc", "epochs must be an integer >= 1, got 'abc'"),
    ('epochs: "3"', "epochs must be an integer >= 1, got '3'"),
    ("epochs: 1.5", "epochs must be an integer >= 1, got 1.5"),
    ('lr: "fast"', "lr must be a finite number > 0 or none, got 'fast'"),
    ('limit_train: "256"', "limit_train must be an integer >= 1 or none, got '256'"),
    ("limit_train: -5", "limit_train must be an integer >= 1 or none, got -5"),
    ("decay_milestones: 5", "decay_milestones must be a list of increasing integers >= 1, got 5"),
    ('channels_last: "no"', "channels_last must be true or false (a YAML boolean), got 'no'"),
    ("model_kwargs: {width_mult: 0}", "model_kwargs.width_mult must be a finite number > 0, got 0"),
]
ISSUE_FLAGS = [
    (["--opt", "nosuch"], "--opt: must be a timm optimizer"),
    (["--sched", "nosuch"], "--sched: must be a timm scheduler that steps per update"),
    (["--sched", "plateau"], "--sched: must be a timm scheduler that steps per update"),
    (["--auto-augment", "bogus"], "--auto-augment: must be a timm AutoAugment spec"),
    (["--label-smoothing", "1.5"], "--label-smoothing: must be a finite number in [0, 1), got 1.5"),
    (["--crop-padding", "-3"], "--crop-padding: must be an integer >= 0, got -3"),
    (["--workers", "-1"], "--workers: must be an integer >= 0 or none, got -1"),
    (["--threads", "-1"], "--threads: must be an integer >= 1 or none, got -1"),
    (["--momentum", "-1"], "--momentum: must be a finite number in [0, 1), got -1.0"),
    (["--lr", "-0.1"], "--lr: must be a finite number > 0 or none, got -0.1"),
    (["--ema-decay", "1.5"], "--ema-decay: must be a finite number in [0, 1), got 1.5"),
    (["--weight-decay", "-1"], "--weight-decay: must be a finite number >= 0, got -1.0"),
    (["--grad-clip", "-1"], "--grad-clip: must be a finite number > 0 or none, got -1.0"),
    (["--hflip", "2"], "--hflip: must be a finite number in [0, 1], got 2.0"),
    (["--mixup", "-1"], "--mixup: must be a finite number >= 0, got -1.0"),
    (["--random-erasing", "2"], "--random-erasing: must be a finite number in [0, 1], got 2.0"),
    (["--checkpoint-every", "-1"], "--checkpoint-every: must be an integer >= 0, got -1"),
    (["--limit-train", "-8"], "--limit-train: must be an integer >= 1 or none, got -8"),
    (["--limit-val", "0"], "--limit-val: must be an integer >= 1 or none, got 0"),
    (["--epochs", "1.5"], "--epochs: must be an integer >= 1, got '1.5'"),
    (["--model-kwargs", "width_mult=0"], "--model-kwargs: width_mult must be a finite number > 0, got 0"),
    (["--model", "aff_cifar_resnt8"], "did you mean aff_cifar_resnet8"),
    (["--momentum", "0"], "--momentum: must be > 0 with opt sgd (Nesterov momentum)"),
]


@pytest.mark.parametrize("text, message", ISSUE_RECIPES)
def test_issue_recipe_values(text, message, tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text(text + "\n")
    rc, out, err = run_cli(["train", "--print-config", "--recipe", str(path)], capsys)
    assert_one_line_error(rc, out, err, f"openaff train: error: recipe {path}: {message}")


@pytest.mark.parametrize("argv, message", ISSUE_FLAGS)
def test_issue_flags(argv, message, capsys):
    rc, out, err = run_cli(["train", "--print-config", *argv], capsys)
    assert_one_line_error(rc, out, err, "openaff train: error: argument ")
    assert message in err, err


def test_plain_sgd_may_have_no_momentum(capsys):
    rc, out, _ = run_cli(["train", "--print-config", "--opt", "momentum", "--momentum", "0"], capsys)
    assert rc == 0 and yaml.safe_load(out)["momentum"] == 0.0


def test_real_process_exit_status_and_one_line(tmp_path):
    """Exit status and stderr as a shell sees them (no in-process SystemExit handling involved)."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("channels_last: 'no'\n")
    for args, message in ((["--epochs", "1.5"], "argument --epochs: must be an integer >= 1, got '1.5'"),
                          (["--recipe", str(bad)], f"recipe {bad}: channels_last must be true or false")):
        res = subprocess.run([sys.executable, "-m", "openaff", "train", "--print-config", *args],
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 2 and res.stdout == "", res.stderr
        assert res.stderr.startswith(f"openaff train: error: {message}") and res.stderr.count("\n") == 1, res.stderr


# --- valid values pass, and --print-config is a recipe ----------------------------------------------

def _expected(rule: Rule, value):
    return float(value) if rule.kind == "float" and value is not None else value


def _as_flag(name: str, rule: Rule, value) -> list[str]:
    f = flag(name)
    if rule.kind == "bool":
        return [f if value else f"--no-{f[2:]}"]
    if rule.kind == "kwargs":
        return [f, *(f"{k}={v!r}" for k, v in value.items())]
    if rule.kind == "milestones":
        return [f, *map(str, value)]
    return [f"{f}={'none' if value is None else repr(value) if rule.kind == 'float' else value}"]


@pytest.mark.parametrize("name", FLAG_FIELDS)
@PROPERTY
@given(data=st.data())
def test_valid_flag_value_is_printed_and_round_trips(name, data, capsys, tmp_path):
    rule = RULES[name]
    value = data.draw(valid_value(rule), label="value")
    rc, out, err = run_cli(["train", "--print-config", *_as_flag(name, rule, value)], capsys)
    assert rc == 0 and err == "", err
    printed = yaml.safe_load(out)
    assert printed[name] == _expected(rule, value)
    # The printed configuration is a recipe that gives the same configuration back.
    path = tmp_path / "printed.yaml"
    path.write_text(out)
    assert to_yaml(make_config(str(path))) == out


@pytest.mark.parametrize("name", sorted(RULES))
@PROPERTY
@given(data=st.data())
def test_valid_recipe_value_is_accepted(name, data):
    rule = RULES[name]
    value = data.draw(valid_value(rule), label="value")
    path = write_recipe({name: value})
    try:
        cfg = make_config(path)
        assert getattr(cfg, name) == _expected(rule, value)
        assert type(getattr(cfg, name)) is type(_expected(rule, value))
    finally:
        Path(path).unlink()


def test_shipped_recipes_print_and_round_trip(tmp_path, capsys):
    from openaff.training import recipe_names

    for name in recipe_names():
        rc, out, err = run_cli(["train", "--print-config", "--recipe", name], capsys)
        assert rc == 0, err
        path = tmp_path / f"{name}.yaml"
        path.write_text(out)
        assert to_yaml(make_config(str(path))) == out


# --- the front end: version, exit statuses --------------------------------------------------------

def test_version_agrees_with_pyproject_and_the_installed_metadata(capsys):
    from importlib.metadata import version

    # (tomllib is 3.11+; the package supports 3.10)
    declared = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    assert openaff.__version__ == declared == version("open-aff")
    rc, out, err = run_cli(["--version"], capsys)
    assert rc == 0 and out == f"openaff {declared}\n"


def test_usage_errors_are_one_line(capsys):
    for argv, prefix in ((["trian"], "openaff: error: argument COMMAND: invalid choice: 'trian'"),
                         ([], "openaff: error: the following arguments are required: COMMAND"),
                         (["train", "--no-such-flag"], "openaff train: error: unrecognized arguments: --no-such-flag"),
                         (["bench", "--mode", "fast"], "openaff bench: error: argument --mode: invalid choice")):
        rc, out, err = run_cli(argv, capsys)
        assert_one_line_error(rc, out, err, prefix)


def test_models_without_a_match_exits_2(capsys):
    rc, out, err = run_cli(["models", "no_such_*"], capsys)
    assert_one_line_error(rc, out, err, "openaff models: error: no model of openaff matches 'no_such_*'")
    rc, out, _ = run_cli(["models", "aff_cifar_resnet8", "--json"], capsys)
    assert rc == 0 and '"params": 1339332' in out


def test_ctrl_c_is_one_line_exit_130(monkeypatch, capsys):
    import openaff.catalog

    def interrupted(args, note=None):
        err = KeyboardInterrupt()
        if note:
            err.__notes__ = [note]  # what add_note (Python 3.11+) sets
        raise err

    monkeypatch.setattr(openaff.catalog, "_run", interrupted)
    rc, out, err = run_cli(["models"], capsys)
    assert rc == 130 and err == "openaff models: interrupted\n"
    monkeypatch.setattr(openaff.catalog, "_run", lambda args: interrupted(args, "interrupted; resume with: openaff x"))
    rc, out, err = run_cli(["models"], capsys)
    assert rc == 130 and err == "openaff models: interrupted; resume with: openaff x\n"


def test_closed_pipe_ends_quietly():
    # `openaff models | head -1`: the reader goes away; no BrokenPipeError traceback.
    code = ("import sys, openaff.catalog as catalog, openaff.cli as cli\n"
            "catalog._run = lambda args: [print('x' * 1000, flush=True) for _ in range(10000)] and 0\n"
            "sys.exit(cli.main(['models']))\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.read(10) == b"x" * 10
    proc.stdout.close()
    assert proc.wait(timeout=120) == 141
    assert proc.stderr.read() == b""
