"""One clear line for a user's mistake on the command line; the full traceback for ours.

Every ``python -m apps.*`` / ``python -m demos`` entry point ends with::

    if __name__ == "__main__":
        run_cli(main)

``run_cli`` runs ``main`` and, when it fails with a *user error*, prints ``error: <message>`` on stderr and
exits with status 2 (argparse's status for a bad command line). ``--debug`` anywhere on the command line
(it is removed before ``main`` sees the arguments) or ``HISS_DEBUG=1`` in the environment shows the full
traceback instead. Anything else is a *programming error*: it propagates, so Python prints its traceback
and exits with status 1. Ctrl-C prints ``interrupted`` and exits with 130 (the shell's code for SIGINT).

What counts as a user error (the input, the files or the machine, not the code), deliberately:

- ``UserError`` (below): raise it, or a ValueError, with a message that says what was expected and what
  was given, where it is (file, line, position).
- ``ValueError`` and its subclasses: a bad value, ``ssm_core.CorruptFileError`` (a truncated or corrupt
  checkpoint / cartridge), ``json.JSONDecodeError``, ``UnicodeError``. Except Python's own unpacking
  errors ("too many values to unpack", "not enough values to unpack"): those are bugs.
- ``OSError`` and its subclasses: a missing file or folder, a permission, a full disk, a refused port.
  A message with a file name is shown as ``FILE: reason``.
- ``KeyError`` raised with a sentence (``KeyError("no record 'chr9' in genome.fa")``); a bare key
  (``KeyError('chr9')``, what a failed dict lookup raises) is a bug and keeps its traceback.
- safetensors' ``SafetensorError`` (an unreadable file read outside ssm_core's loaders, which name it).
- ``MemoryError`` and torch's ``OutOfMemoryError``: the input is too large for this machine.

Everything else keeps its traceback: TypeError, AttributeError, AssertionError, IndexError, NameError,
NotImplementedError, RuntimeError (torch's errors included) and the unpacking ValueErrors, bare KeyErrors.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence

__all__ = ["UserError", "run_cli", "user_message", "debug_requested", "DEBUG_FLAG", "DEBUG_ENV", "EXIT_USER_ERROR"]

DEBUG_FLAG = "--debug"
DEBUG_ENV = "HISS_DEBUG"
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130

_UNPACKING = ("values to unpack",)  # "too many ..." / "not enough values to unpack (expected 2, got 1)"


class UserError(Exception):
    """A mistake in what the user gave (arguments, files, text); its message is shown as one line."""


def debug_requested() -> bool:
    """True when ``$HISS_DEBUG`` is set to anything but '' or '0'."""
    return os.environ.get(DEBUG_ENV, "").strip() not in ("", "0")


def _first_arg(exc: BaseException) -> str:
    return exc.args[0] if len(exc.args) == 1 and isinstance(exc.args[0], str) else ""


def user_message(exc: BaseException) -> str | None:
    """The line to show for a user error, or None when ``exc`` is a programming error (keep the traceback)."""
    if isinstance(exc, UserError):
        text = str(exc)
    elif isinstance(exc, KeyError):
        text = _first_arg(exc)
        if not any(ch.isspace() for ch in text):  # KeyError('x'): a failed lookup in our code
            return None
    elif isinstance(exc, ValueError):
        text = str(exc)
        if any(s in text for s in _UNPACKING) and type(exc) is ValueError:
            return None
    elif isinstance(exc, OSError):
        if exc.filename is not None and exc.strerror:
            where = f"{exc.filename} -> {exc.filename2}" if exc.filename2 is not None else f"{exc.filename}"
            text = f"{where}: {exc.strerror}"
        else:
            text = str(exc) or (exc.strerror or "")
    elif isinstance(exc, MemoryError) or type(exc).__name__ in ("OutOfMemoryError", "SafetensorError"):
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        if type(exc).__name__ != "SafetensorError":
            text = f"out of memory{': ' + text if text else ''} (try a smaller input, batch or model)"
        else:
            text = f"unreadable safetensors file: {text}"
    else:
        return None
    text = text.strip() or type(exc).__name__
    return text


def run_cli(main: Callable[..., object], argv: Sequence[str] | None = None) -> object:
    """Run ``main`` as a command-line entry point: user errors become ``error: <message>`` and exit status 2;
    returns what ``main`` returns (``raise SystemExit(run_cli(main))`` for a main that returns an exit status).

    ``argv=None`` (the usual case) leaves the arguments in ``sys.argv`` for ``main()`` to read, minus
    ``--debug``; a given ``argv`` list is passed on as ``main(argv)``, minus ``--debug``. See the module
    docstring for which exceptions are user errors.
    """
    if argv is None:
        debug = DEBUG_FLAG in sys.argv[1:]
        saved = sys.argv
        if debug:
            sys.argv = [saved[0], *(a for a in saved[1:] if a != DEBUG_FLAG)]
        call = main
    else:
        args = [str(a) for a in argv]
        debug = DEBUG_FLAG in args
        args = [a for a in args if a != DEBUG_FLAG]
        saved = None

        def call():
            return main(args)

    debug = debug or debug_requested()
    try:
        return call()
    except KeyboardInterrupt:
        if debug:
            raise
        print("interrupted", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_INTERRUPTED) from None
    except Exception as exc:  # noqa: BLE001 - sorted into user / programming errors right here
        message = None if debug else user_message(exc)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_USER_ERROR) from None
    finally:
        if saved is not None:
            sys.argv = saved
