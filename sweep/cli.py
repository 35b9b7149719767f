"""What every command line of ours shares: the user-error type, the exit-2 wrapper and library quieting.

Imports nothing heavy (no Ray, no torch), so ``--help``, ``--dry-run`` and export's argument checks
answer in about a second.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from typing import Callable


class UserError(Exception):
    """Bad input from the user. The message is one line, ready to print; the command exits 2."""


class RunError(Exception):
    """The sweep started but could not go on (a full disk, a tracking store gone away). The message is one
    line saying what to do; the table and the MLflow runs are closed first; the command exits 1."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, except that a usage error is one line like every other bad input (exit 2), not the
    whole usage text."""

    def error(self, message: str):
        self.exit(2, f"error: {' '.join(message.split())} (see {self.prog} --help)\n")


def exit_code(main: Callable[[], int]) -> int:
    """Run a command's body: a UserError becomes ``error: <line>`` on stderr and exit code 2, a RunError
    the same line and exit code 1, Ctrl-C outside a running sweep a line and 130 (the shell's code)."""
    quiet_libraries()
    try:
        return main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RunError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def quiet_libraries() -> None:
    """The driver trains nothing: library deprecation notes would only bury our one-line errors."""
    for category in (FutureWarning, UserWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # optional CPU kernels it looks for on the Hub
    logging.getLogger("datasets").setLevel(logging.CRITICAL)  # a bad file is reported by us, in one line
    if "datasets" in sys.modules:  # already imported (as in tests): its env var is read at import only
        sys.modules["datasets"].disable_progress_bars()
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
