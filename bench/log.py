"""How the harness speaks to the user: every module logs through its own ``logging.getLogger(__name__)``, and the
command line installs one handler (:func:`setup`) that prints the lines a user reads on stderr.

Levels and what the user sees:

- ``log.error(msg)``   -> ``error: msg``
- ``log.warning(msg)`` -> ``warning: msg``
- ``note(log, msg)``   -> ``note: msg`` (level ``NOTE``, between INFO and WARNING: worth reading, nothing wrong)
- ``log.info(msg)``    -> ``msg`` (progress, such as ``wrote results/summary.md``)
- ``log.debug(msg)``   -> ``debug: msg``, shown only with ``--verbose``

``--quiet`` keeps warnings and errors. Without :func:`setup` (the package used as a library) Python's own last-resort
handler prints warnings and errors only, and the caller's logging configuration decides the rest.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import typing

NOTE = 25
LOGGERS = ("bench", "exporters")  # the packages' top loggers; every module's logger is a child of one
_PREFIX = {
    logging.ERROR: "error: ",
    logging.CRITICAL: "error: ",
    logging.WARNING: "warning: ",
    NOTE: "note: ",
    logging.DEBUG: "debug: ",
}


def note(log: logging.Logger, msg: str, *args: object) -> None:
    """Log ``msg`` at the ``NOTE`` level (printed as ``note: msg``)."""
    log.log(NOTE, msg, *args)


def count(n: int, noun: str, plural: str | None = None) -> str:
    """``n`` and the noun, plural unless ``n`` is 1: "1 epoch", "3 epochs", "1 batch", "2 batches"."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"


def first_line(e: BaseException, empty: str | None = None) -> str:
    """The useful part of an error for a one-line message: its first line (when it has no text, ``empty``, by default
    its type's name); for a server that cannot be reached, urllib3's cause alone (its whole message repeats the URL
    three times)."""
    text = str(e).strip()
    if not text:
        return type(e).__name__ if empty is None else empty
    line = text.splitlines()[0]
    cause = re.search(r"Caused by \w+\(\"[^\"]*?\): (.*)$", line)
    if cause:
        return "cannot reach the server: " + re.sub(r"\"\)+$", "", cause.group(1))
    return line[:300]


class _Prefixed(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return _PREFIX.get(record.levelno, "") + super().format(record)


class _Stderr(logging.StreamHandler):
    """A handler that writes to whatever ``sys.stderr`` is when a record arrives (pytest's capture replaces it), above
    any progress bar: while a tqdm bar is drawn, through ``tqdm.write``, which clears the bars and draws them again."""

    def emit(self, record: logging.LogRecord) -> None:
        bars = sys.modules.get("tqdm.auto")  # not imported: no bar to keep clear of
        if bars is None or not getattr(bars.tqdm, "_instances", None):
            super().emit(record)
            return
        try:
            bars.tqdm.write(self.format(record), file=sys.stderr)
        except Exception:
            self.handleError(record)

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value: object) -> None:  # StreamHandler.__init__ assigns it; the property ignores that
        pass


def setup(verbosity: int = 0) -> None:
    """Install the stderr handler on the packages' loggers (replacing an earlier one): ``verbosity`` -1 is
    ``--quiet`` (warnings and errors), 0 the default (from INFO), 1 ``--verbose`` (from DEBUG)."""
    logging.addLevelName(NOTE, "NOTE")
    level = logging.WARNING if verbosity < 0 else logging.DEBUG if verbosity > 0 else logging.INFO
    handler = _Stderr()
    handler.setFormatter(_Prefixed("%(message)s"))
    for name in LOGGERS:
        logger = logging.getLogger(name)
        for old in [h for h in logger.handlers if isinstance(h, _Stderr)]:
            logger.removeHandler(old)
        logger.addHandler(handler)
        logger.setLevel(level)
        logger.propagate = False  # the command line owns the output: no second copy through the root logger


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one ``error:`` line naming the (sub)command and where its options are listed, instead of a usage
    block; exit status 2 (a usage error), as every command line of the project."""

    def error(self, message: str) -> typing.NoReturn:
        logging.getLogger(LOGGERS[0]).error("%s: %s (options: %s --help)", self.prog, message, self.prog)
        self.exit(2)


# The verbosity flags and the value each gives: add_options defines them, and the command line reads them before the
# subcommand's name (to report an argument error at the right verbosity).
FLAGS = {"-q": -1, "--quiet": -1, "-v": 1, "--verbose": 1}


def add_options(p: argparse.ArgumentParser, default: object = 0) -> None:
    """``-q/--quiet`` and ``-v/--verbose`` on ``p``, as ``args.verbosity`` for :func:`setup`; a subcommand's parser
    takes ``default=argparse.SUPPRESS``, so that its own default does not undo the flag given before its name."""
    m = p.add_mutually_exclusive_group()
    m.add_argument(
        "-q",
        "--quiet",
        dest="verbosity",
        action="store_const",
        const=FLAGS["--quiet"],
        default=default,
        help="only warnings and errors on stderr (no notes, no progress lines)",
    )
    m.add_argument(
        "-v",
        "--verbose",
        dest="verbosity",
        action="store_const",
        const=FLAGS["--verbose"],
        default=default,
        help="also debugging lines on stderr (debug: ...)",
    )


def verbosity() -> int | None:
    """The ``verbosity`` :func:`setup` installed (for a worker process to install the same), None without it."""
    logger = logging.getLogger(LOGGERS[0])
    if not any(isinstance(h, _Stderr) for h in logger.handlers):
        return None
    return -1 if logger.level >= logging.WARNING else 1 if logger.level <= logging.DEBUG else 0
