"""The ``pacs-classifier`` command line.

Each sub-command lives in its own module under :mod:`pacs_classifier.commands` and exposes
``ORDER`` (its place in ``--help``) and ``register(subparsers)``; the parser is assembled
from whatever modules are there. Nothing here imports TensorFlow: commands that need it
import it inside their ``run`` function, so ``--help``, ``report`` and ``db upgrade`` start
fast.

A user's mistake (bad path, bad config, unreachable database) ends with one line on
stderr and a non-zero status, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from collections.abc import Sequence
from types import ModuleType

from pacs_classifier import __version__, commands, logs
from pacs_classifier.errors import PacsClassifierError, PermanentError

EXIT_OK = 0
EXIT_FAILURE = 1  # a retryable condition: database down, disk full
EXIT_USAGE = 2  # a permanent one: bad arguments, bad config, corrupt input


def _command_modules() -> list[ModuleType]:
    mods = [
        importlib.import_module(f"{commands.__name__}.{info.name}")
        for info in pkgutil.iter_modules(commands.__path__)
        if not info.name.startswith("_")
    ]
    return sorted(mods, key=lambda m: (getattr(m, "ORDER", 100), m.__name__))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pacs-classifier",
        description="DICOM gateway that classifies chest radiographs (PNEUMONIA vs NORMAL).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--config",
        metavar="PATH",
        help="configuration file (default: $PACS_CLASSIFIER_CONFIG or ./config.toml)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for mod in _command_modules():
        mod.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command. ``argv`` None: this process is the program (see :func:`logs.setup`)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logs.setup(verbose=args.verbose, program=argv is None)
    try:
        return int(args.func(args))
    except PacsClassifierError as exc:
        print(f"pacs-classifier: error: {exc}", file=sys.stderr)
        return EXIT_USAGE if isinstance(exc, PermanentError) else EXIT_FAILURE
    except KeyboardInterrupt:
        print("pacs-classifier: interrupted", file=sys.stderr)
        return 130
