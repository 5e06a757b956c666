"""How every `opd` command fails: one line on stderr, `opd <cmd>: <what is wrong, naming the input>`, and a non-zero
exit status; a traceback only with `--debug` or `OPD_DEBUG=1`.

Why one handler: each command used to catch its own list of exceptions, so some errors (a DataError in `opd eval
grade`, a YAML syntax error, a read-only output folder) escaped as tracebacks from one command and not another.
The project's errors say what is wrong in their message (DataError names the file, row and column; config errors
name the setting), so the handler only prints it. What it treats as bad input rather than a bug:

- `UsageError`: the command line itself is wrong (an option, a setting): exit 2, as argparse does;
- ValueError (DataError, config validation, VocabularyMismatchError, JSON errors), OSError (missing, read-only,
  full or forbidden paths), a plugin that fails to load, a YAML syntax error: exit 1;
- torch's out-of-memory error, with the settings that bound memory: exit 1;
- Ctrl-C: "interrupted", exit 130.

Anything else (TypeError, IndexError, ...) is a bug and keeps its traceback. A ValueError raised inside a library
rather than by OPD is still one line, but says which library raised it and that --debug shows where.

    @command("opd data prepare")
    def main(argv=None) -> int: ...
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

__all__ = ["UsageError", "usage_errors", "check_writable", "describe", "run_command", "command", "DEBUG_FLAG"]

DEBUG_FLAG = "--debug"

EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130

_WRITE_ERRNOS = {
    errno.ENOSPC: "no space left on device writing {}",
    errno.EDQUOT: "disk quota exceeded writing {}",
    errno.EROFS: "read-only file system: cannot write {}",
    errno.EACCES: "permission denied: {}",
    errno.EPERM: "permission denied: {}",
}
_MISSING_ERRNOS = {
    errno.ENOENT: "no such file or folder: {}",
    errno.ENOTDIR: "not a folder: {}",
    errno.EISDIR: "is a folder, expected a file: {}",
    errno.EEXIST: "already exists: {}",
}


class UsageError(ValueError):
    """The command line is wrong (an option value, a setting, options that clash): exit status 2."""


@contextlib.contextmanager
def usage_errors() -> Iterator[None]:
    """Inside the block, a ValueError or FileNotFoundError (bad settings, a missing --config file) is a UsageError."""
    try:
        yield
    except UsageError:
        raise
    except (ValueError, FileNotFoundError) as exc:
        raise UsageError(_first_line(exc)) from exc


def check_writable(path: str | os.PathLike, flag: str) -> None:
    """Fail now if nothing can be written where the output `path` goes (a read-only or forbidden folder), so a
    command refuses before its heavy work rather than after. Probes the nearest existing folder with a temporary
    file and creates nothing."""
    target = Path(path).absolute()
    folder = target if target.is_dir() else target.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, f"{path} ({flag})") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0].strip()


def _raised_in(exc: BaseException) -> str:
    """The top-level package of the module whose code raised `exc` ("opd", "transformers", ...)."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    name = tb.tb_frame.f_globals.get("__name__", "") if tb is not None else ""
    return name.split(".")[0] if name else ""


def _os_message(exc: OSError) -> str:
    path = exc.filename if exc.filename is not None else None
    if path is not None and exc.filename2 is not None:
        path = f"{path} -> {exc.filename2}"
    template = _WRITE_ERRNOS.get(exc.errno) or _MISSING_ERRNOS.get(exc.errno)
    if path is not None and template is not None:
        return template.format(path)
    return _first_line(exc)  # OPD's own OSErrors (and StorageError) already word the path and the reason


def _is_yaml_error(exc: BaseException) -> bool:
    return any(cls.__module__.split(".")[0] == "yaml" and cls.__name__ == "YAMLError" for cls in type(exc).__mro__)


def describe(exc: BaseException) -> str | None:
    """The one-line message for an error that is bad input or a failing environment; None for a bug."""
    from opd.core.plugins import PluginError

    if isinstance(exc, OSError):
        return _os_message(exc)
    if isinstance(exc, PluginError) or _is_yaml_error(exc):
        return _first_line(exc)
    if type(exc).__name__ == "OutOfMemoryError":  # torch's, on the GPU: the sizes are the user's to change
        return f"{_first_line(exc)} (lower MICRO_BATCH_TOKENS / ROLLOUT_BATCH_SIZE / --batch-size)"
    if isinstance(exc, ValueError):
        where = _raised_in(exc)
        if type(exc).__module__.split(".")[0] == "opd" or where in ("opd", "json", "codecs", "", "__main__"):
            return _first_line(exc)  # OPD's own error types (DataError, UsageError, ...) wherever raised
        return f"{_first_line(exc)} ({type(exc).__name__} raised by {where}; {DEBUG_FLAG} shows where)"
    return None


def _exit_code(exc: BaseException) -> int:
    return EXIT_USAGE if isinstance(exc, UsageError) else EXIT_FAILED


def debug_requested(argv: list[str]) -> tuple[bool, list[str]]:
    """(traceback wanted, argv without --debug)."""
    wanted = os.environ.get("OPD_DEBUG", "").strip().lower() not in ("", "0", "false", "no", "off")
    if DEBUG_FLAG in argv:
        wanted, argv = True, [a for a in argv if a != DEBUG_FLAG]
    return wanted, argv


_debug_stack: list[bool] = []  # an outer handler's --debug holds for the command's own (nested) handler


def run_command(prog: str, fn: Callable[[list[str]], int | None], argv: list[str] | None = None) -> int:
    """Run `fn(argv)` as the command `prog`; bad input becomes one line on stderr and a non-zero return value."""
    debug, argv = debug_requested(list(sys.argv[1:] if argv is None else argv))
    debug = debug or any(_debug_stack)
    _debug_stack.append(debug)
    try:
        return int(fn(argv) or 0)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"\n{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:
        message = None if debug else describe(exc)
        if message is None:
            raise
        print(f"{prog}: {message}", file=sys.stderr)
        return _exit_code(exc)
    finally:
        _debug_stack.pop()


def command(prog: str):
    """Decorate a command's `main(argv)` so that it fails the one way, whether `opd` or `python -m` runs it."""

    def wrap(fn):
        @functools.wraps(fn)
        def main(argv: list[str] | None = None) -> int:
            return run_command(prog, fn, argv)

        return main

    return wrap
