"""User errors: bad arguments, config values or input files.

Validation points raise :class:`UsageError` (or ``ValueError`` / ``FileNotFoundError`` /
``PermissionError``, which older checks raise with the same kind of message); the ``attnres`` entry
point (``lightning_modules.main``) prints ``attnres <subcommand>: <message>`` on one line of stderr and
exits with status 2. ``ATTNRES_DEBUG=1`` re-raises instead, so the full traceback is shown. Any other
exception is an internal error and keeps its traceback, and so does a plain ``ValueError`` raised
outside this project's code (inside torch or Lightning, say): :func:`is_user_error`.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import NoReturn


class UsageError(ValueError):
    """A problem with the user's input. The message names the argument (``--ckpt``, ``model.lr``) and
    the fix, on one line."""


# about the user's files: always shown as one line (exit 2)
FILE_ERRORS: tuple[type[BaseException], ...] = (
    FileNotFoundError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
)
# the directories of this project's code: a ValueError raised there is one of its checks
OUR_CODE = (Path(__file__).resolve().parent, Path(__file__).resolve().parent.parent / "lightning_modules")


def is_user_error(exc: BaseException) -> bool:
    """Whether the entry point shows ``exc`` as one line: a :class:`UsageError`, a file error, or a
    ``ValueError`` whose innermost Python frame is in this project's code (its validation points
    predate :class:`UsageError`); a ``ValueError`` from inside a library keeps its traceback."""
    if isinstance(exc, (UsageError, *FILE_ERRORS)):
        return True
    if not isinstance(exc, ValueError) or exc.__traceback__ is None:
        return False
    tb = exc.__traceback__
    while tb.tb_next is not None:
        tb = tb.tb_next
    where = Path(tb.tb_frame.f_code.co_filename).resolve()
    return any(where.is_relative_to(root) for root in OUR_CODE)


EXIT_USAGE = 2  # argparse's status for a usage error


def debug_mode() -> bool:
    """``ATTNRES_DEBUG`` set to anything but empty/0: show tracebacks of user errors."""
    return os.environ.get("ATTNRES_DEBUG", "") not in ("", "0")


def one_line(message: str) -> str:
    """``message`` on a single line: whitespace runs (newlines included) become one space."""
    return re.sub(r"\s+", " ", message).strip()


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """``"; did you mean 'x'?"`` for the closest of ``choices`` to ``word`` (difflib), or ``""``."""
    match = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"; did you mean {match[0]!r}?" if match else ""


class ParseError(UsageError):
    """A command line or config file the parser rejected (raised by :class:`RaiseOnParseError`)."""


class RaiseOnParseError:
    """Mixin for a jsonargparse ``ArgumentParser`` class: a parse error raises :class:`ParseError` with
    a one-line message (and a "did you mean" for a misspelled key or choice) instead of printing the
    usage and exiting, so the entry point reports it like any other user error. Subcommand parsers
    are made with ``type(parser)``, so they inherit it. ``refused`` maps an option the parser does not
    offer on purpose to the advice shown when it is given."""

    refused: dict[str, str] = {}

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        parser = getattr(ex, "subcommand_parser", None) or self
        raise ParseError(parse_error_message(message, parser_keys(parser), self.refused)) from ex


def parser_keys(parser: object) -> list[str]:
    """Every key a jsonargparse parser accepts (``trainer.max_steps``), its subcommands' included."""
    keys: list[str] = []
    for action in getattr(parser, "_actions", []):
        if action.dest not in ("help", "==SUPPRESS==") and not action.dest.startswith("_"):
            keys.append(action.dest)
        for name, sub in (getattr(action, "choices", None) or {}).items():
            if hasattr(sub, "_actions"):
                keys += [name] + [f"{name}.{k}" for k in parser_keys(sub)]
    return keys


def parse_error_message(message: str, keys: list[str], refused: dict[str, str] | None = None) -> str:
    """jsonargparse's (often multi-line) error ``message`` as one line: an unknown option gets the
    closest of ``keys`` as a suggestion (or its ``refused`` advice), a bad value names the key, the
    value and the expected type."""
    text = one_line(message)
    unknown = re.match(r"unrecognized arguments: --?([\w.\-]+)", text) or re.search(
        r"does not accept (?:option|nested key) '([\w.\-]+)'", text
    )
    if unknown:
        key = unknown.group(1)
        for name, advice in (refused or {}).items():
            if key == name or key.startswith(name + "."):
                return f"--{name} is not supported: {advice}"
        dashed = [f"--{k}" for k in keys] if text.startswith("unrecognized") else keys
        word = f"--{key}" if text.startswith("unrecognized") else key
        return text + did_you_mean(word, dashed)
    bad_value = re.match(r'Parser key "([\w.]+)": (.*)', text)
    if bad_value:
        key, rest = bad_value.groups()
        given = re.search(r"(?:Got value|Given value): (.*?)$", rest)
        value = f" {given.group(1)}" if given else ""
        choices = re.search(r"Literal\[(.*?)\]", rest)
        if choices:
            valid = [c.strip().strip("'\"") for c in choices.group(1).split(",")]
            if re.search(r"Subtypes: \[<class 'bool'>", rest):  # bool | Literal[...]: true and false too
                valid = ["true", "false", *valid]
            hint = did_you_mean(value.strip(), valid)
            return f"--{key}{value}: expected one of {', '.join(valid)}{hint}"
        types = re.findall(r"<class '(\w+)'>", rest.split("Given value type")[0])
        if types and given:
            names = ", ".join("null" if t == "NoneType" else t for t in dict.fromkeys(types))
            return f"--{key}{value}: expected {names}"
        return f"--{key}: {rest}"
    return text
