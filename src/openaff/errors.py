"""Errors a user can fix (bad data, bad flags, a diverged run), reported by the commands on one line."""

from __future__ import annotations

import argparse
import math
import numbers
import sys
from collections.abc import Callable
from typing import Any, NoReturn

__all__ = ["CheckpointError", "ConfigError", "CorruptImageError", "DataError", "NonFiniteLossError",
           "OneLineParser", "OpenAFFError", "check_int", "check_number", "flag_type", "is_integer", "is_number",
           "one_line", "run_alone", "run_command"]


class OpenAFFError(Exception):
    """Base class: the message says what is wrong and, where it can, what to do about it."""


class ConfigError(OpenAFFError):
    """An unknown recipe, flag value or model setting."""


class DataError(OpenAFFError):
    """A missing, empty or unreadable data set, or one that does not fit the model."""


class CorruptImageError(DataError):
    """An image file that cannot be decoded (the message names the file)."""


class CheckpointError(OpenAFFError):
    """A checkpoint or weight file that is missing, unreadable or does not fit the model."""


class NonFiniteLossError(OpenAFFError):
    """Training diverged (NaN or infinite loss); the last good checkpoint is kept."""


# --- argument checks: one style for every function and flag that takes a number from a user ----------------------

def is_integer(value: object) -> bool:
    """A Python or NumPy integer, and not a bool (an int to Python, but ``epochs: yes`` is never a count)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    """A real number (int, float or NumPy scalar), and not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_int(value: Any, requirement: str, *, lo: int = 1, hi: int | None = None,
              error: type[Exception] = ConfigError) -> Any:
    """``value`` if it is an integer from ``lo`` to ``hi``; otherwise ``error("<requirement>, got <value>")``.

    Args:
        value: what the caller was given.
        requirement: the message's start, naming the setting and what it must be
            (``"--jobs must be an integer >= 1"``).
        lo: the smallest value allowed.
        hi: the largest value allowed (None: no bound).
        error: the exception raised (:class:`ValueError` for model constructors, an :class:`OpenAFFError` for
            commands, which report it on one line).
    """
    if not is_integer(value) or value < lo or (hi is not None and value > hi):
        raise error(f"{requirement}, got {value!r}")
    return value


def check_number(value: Any, requirement: str, *, gt: float | None = None, lo: float | None = None,
                 hi: float | None = None, error: type[Exception] = ConfigError) -> Any:
    """``value`` if it is a real number above ``gt``, from ``lo`` to ``hi``; otherwise ``error`` as :func:`check_int`.

    NaN fails every bound.
    """
    ok = is_number(value) and not math.isnan(value) and (gt is None or value > gt) \
        and (lo is None or value >= lo) and (hi is None or value <= hi)
    if not ok:
        raise error(f"{requirement}, got {value!r}")
    return value


def flag_type(cast: Callable[[str], Any], *, what: str, lo: float | None = None,
              gt: float | None = None) -> Callable[[str], Any]:
    """An argparse ``type=`` for a number flag: ``cast(text)`` and a bound, each with a one-line message.

    ``--limit 1.5`` gives ``argument --limit: must be <what>, got '1.5'``; ``--limit 0`` with ``lo=1`` gives
    ``must be >= 1, got '0'`` (with ``gt=0``: ``must be > 0``, and infinity is refused too).

    Args:
        cast: ``int`` or ``float``.
        what: what the flag's text must be, for the message (``"an integer"``).
        lo: the smallest value allowed.
        gt: the value it must be above.
    """
    def parse(text: str) -> Any:
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        if lo is not None and not value >= lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {text!r}")
        if gt is not None and not (value > gt and math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"must be > {gt}, got {text!r}")
        return value

    parse.__name__ = cast.__name__  # argparse names the type in its own messages
    return parse


def one_line(err: BaseException) -> str:
    """The user-facing line of ``err``.

    An error raised in a DataLoader worker comes back re-raised with the worker's traceback in
    its message; its last line is the original ``module.Type: message``.
    """
    text = str(err).strip()
    if "Original Traceback" in text:
        last = text.splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return " ".join(text.split("\n")[0].split()) or type(err).__name__


def run_command(prog: str, fn: Callable[[], int | None]) -> int:
    """Run a sub-command, turning an :class:`OpenAFFError` into ``prog: error: ...`` and exit status 2."""
    try:
        return int(fn() or 0)
    except OpenAFFError as err:
        print(f"{prog}: error: {one_line(err)}", file=sys.stderr, flush=True)
        return 2


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line, ``openaff train: error: ...``, exit status 2.

    argparse would print the whole usage first (dozens of lines for ``openaff train``), burying
    the one line that says what is wrong; ``--help`` still shows it all.
    """

    commands: argparse._SubParsersAction | None = None

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")

    def parse_args(self, args=None, namespace=None):  # noqa: ANN001, ANN201  (argparse's signature)
        # Unknown flags are found after the sub-command has parsed its own: blame that sub-command.
        parsed, extra = self.parse_known_args(args, namespace)
        if extra:
            sub = self.commands.choices.get(getattr(parsed, "command", None)) if self.commands else None
            (sub or self).error(f"unrecognized arguments: {' '.join(extra)}")
        return parsed


def run_alone(command: str, add_parser: Callable[[argparse._SubParsersAction], None],
              argv: list[str] | None = None) -> int:
    """``openaff COMMAND ARGS`` without the ``openaff`` front end (``python -m openaff.bench``, ``openaff.cam``).

    The same parser, one-line messages and exit status as through ``openaff``, with only ``command``'s module.

    Args:
        command: the sub-command's name.
        add_parser: its module's ``add_parser(subparsers)``.
        argv: the arguments after the command (default: ``sys.argv[1:]``).
    """
    parser = OneLineParser(prog="openaff")
    parser.commands = parser.add_subparsers(dest="command")
    add_parser(parser.commands)
    args = parser.parse_args([command, *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)
