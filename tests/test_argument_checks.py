"""openaff.errors' argument checks: the one style every function and flag uses for numbers from a user."""

import argparse

import numpy as np
import pytest

from openaff.errors import ConfigError, check_int, check_number, flag_type, is_integer, is_number


def test_integers_and_numbers_exclude_bool():
    assert is_integer(3) and is_integer(np.int64(3)) and not is_integer(True) and not is_integer(3.0)
    assert is_number(0.5) and is_number(np.float32(0.5)) and is_number(2) and not is_number(False)
    assert not is_number("1")


@pytest.mark.parametrize("value", [0, -1, True, 1.0, "2", None, 11])
def test_check_int_names_the_requirement_and_the_value(value):
    with pytest.raises(ConfigError, match=rf"^--jobs must be an integer from 1 to 10, got {value!r}$"):
        check_int(value, "--jobs must be an integer from 1 to 10", hi=10)


def test_check_int_returns_the_value_and_raises_the_callers_error():
    assert check_int(np.int64(4), "n", lo=4) == 4
    with pytest.raises(ValueError, match="inputs must be an integer >= 2, got 1$"):
        check_int(1, "inputs must be an integer >= 2", lo=2, error=ValueError)


@pytest.mark.parametrize("value", [0, -0.5, float("nan"), True, "1"])
def test_check_number_refuses_nan_bools_and_out_of_bounds(value):
    with pytest.raises(ConfigError, match="sigma must be > 0, got"):
        check_number(value, "sigma must be > 0", gt=0)
    assert check_number(0.5, "x", lo=0, hi=0.5) == 0.5
    with pytest.raises(ConfigError, match="got 0.6"):
        check_number(0.6, "x", lo=0, hi=0.5)


def test_flag_type_messages():
    parse = flag_type(int, what="an integer", lo=1)
    assert parse("3") == 3 and parse.__name__ == "int"
    with pytest.raises(argparse.ArgumentTypeError, match=r"^must be an integer, got '1.5'$"):
        parse("1.5")
    with pytest.raises(argparse.ArgumentTypeError, match=r"^must be >= 1, got '0'$"):
        parse("0")
    positive = flag_type(float, what="a number > 0", gt=0)
    for bad in ("0", "inf", "nan", "-2"):
        with pytest.raises(argparse.ArgumentTypeError, match=rf"^must be > 0, got '{bad}'$"):
            positive(bad)
