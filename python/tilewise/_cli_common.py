"""What the Python subcommands (`tilewise calibrate`, `tilewise train`) share: one-line errors like the C++ CLI's.

A user's mistake (a bad flag, a bad input file or value) is printed as `tilewise: error: ...` with exit code 2,
an I/O failure (e.g. a full disk) with exit code 1; never a traceback.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Optional, Sequence


class UsageError(Exception):
    """A mistake on the command line or in an input file: printed as one line, exit code 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, like the C++ CLI
        raise UsageError(message)


def main_reporting_errors(run: Callable[[Sequence[str]], int], argv: Optional[Sequence[str]],
                          import_hint: Optional[str] = None) -> int:
    """run(argv) (argv None: the process's arguments) with user mistakes reported as above. `import_hint`: what
    to install when an optional dependency is missing (None: an ImportError is a bug, not the user's mistake)."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        return run(argv)
    except UsageError as e:
        print(f"tilewise: error: {e}", file=sys.stderr)
        return 2
    except ImportError as e:
        if import_hint is None:
            raise
        print(f"tilewise: error: {getattr(e, 'msg', e)}; {import_hint}", file=sys.stderr)
        return 2
    except (ValueError, KeyError, TypeError) as e:  # bad input files or values: the messages name them
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"tilewise: error: {msg}", file=sys.stderr)
        return 2
    except OSError as e:  # e.g. the disk filled up while writing
        print(f"tilewise: error: {e.strerror or e}{f': {e.filename}' if e.filename else ''}", file=sys.stderr)
        return 1
