"""File helpers every part of OPD shares: atomic writes, storage errors, folder manifests, torn-line repair and
JSON-safe values.

Atomic writes (temporary file in the target folder, then os.replace) mean an interrupted run or tool never leaves a
half-written output that a later step would read as complete. A write that fails for lack of space or permission
raises `StorageError` (an OSError), whose text is one line saying why and naming the path, whatever library did the
writing (torch, safetensors and tokenizers each word it differently). A manifest (`manifest.json`: size and sha256
of every file, written last) lets a reader tell a complete folder from a damaged one before loading it.
`repair_torn_tail` cuts an append-only JSONL file back to its last complete line (what a kill mid-write leaves).
`json_safe` turns non-finite floats into null, so every JSON file OPD writes is strict JSON (NaN is not JSON, and
readers such as jq reject it).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = [
    "StorageError",
    "storage_errors",
    "atomic_path",
    "atomic_write_text",
    "replace_dir",
    "fsync_tree",
    "write_manifest",
    "manifest_problem",
    "repair_torn_tail",
    "json_safe",
    "MANIFEST",
]

MANIFEST = "manifest.json"

# errno -> the words the one-line message uses
_STORAGE_ERRNOS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
}
# how libraries that do their own I/O word those errors (safetensors: "(os error 28)"; torch: "[Errno 28]")
_ERRNO_IN_TEXT = re.compile(r"os error (\d+)|\[Errno (\d+)\]|code: (\d+)")
_TEXT_ERRNO = {"No space left on device": errno.ENOSPC, "Read-only file system": errno.EROFS}


class StorageError(OSError):
    """A write that failed for lack of space or permission. `str()` is one line: why, and what was being written
    where, e.g. "no space left on device while writing checkpoint runs/x/checkpoints/step_000004"."""

    def __init__(self, code: int, message: str, path: str | os.PathLike | None = None):
        super().__init__(code, message)
        self.message, self.path = message, None if path is None else str(path)

    def __str__(self) -> str:
        return self.message


def _storage_errno(exc: BaseException) -> int | None:
    """The storage errno behind `exc`, if it is one (an OSError, or a library error that quotes one)."""
    if isinstance(exc, OSError) and exc.errno in _STORAGE_ERRNOS:
        return exc.errno
    for link in (exc, exc.__cause__, exc.__context__):
        if link is None:
            continue
        text = str(link)
        for m in _ERRNO_IN_TEXT.finditer(text):
            code = int(next(g for g in m.groups() if g))
            if code in _STORAGE_ERRNOS:
                return code
        for words, code in _TEXT_ERRNO.items():
            if words in text:
                return code
        if isinstance(link, OSError) and link.errno in _STORAGE_ERRNOS:
            return link.errno
    return None


@contextlib.contextmanager
def storage_errors(what: str, path: str | os.PathLike) -> Iterator[None]:
    """Turn a space / permission failure inside the block into `StorageError` naming `what` and `path`; any other
    error passes unchanged."""
    try:
        yield
    except StorageError:
        raise
    except Exception as exc:
        code = _storage_errno(exc)
        if code is None:
            raise
        label = f"{what} {path}" if what else str(path)
        raise StorageError(code, f"{_STORAGE_ERRNOS[code]} while writing {label}", path) from exc


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once at import: os.umask is process-wide, so never toggle it while threads write


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it replaces `path`, on error it is removed."""
    path = Path(path)
    with storage_errors("", path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        with storage_errors("", path):
            yield Path(tmp)
            if Path(tmp).exists():  # mkstemp creates 0600; give the file the mode a plain open() would have
                os.chmod(tmp, 0o666 & ~_UMASK)
            os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8) to `path` all or nothing."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def replace_dir(tmp: str | os.PathLike, final: str | os.PathLike) -> None:
    """Move the finished folder `tmp` to `final`. An existing `final` is kept (as `.old-<name>`) until the new one is
    in place, so a crash in between never leaves neither."""
    tmp, final = Path(tmp), Path(final)
    old = final.parent / f".old-{final.name}"
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def fsync_tree(folder: str | os.PathLike) -> None:
    """Flush every file under `folder`, and the folders themselves, to the disk (a rename is durable only after)."""
    folder = Path(folder)
    for path in sorted(folder.rglob("*")) + [folder]:
        flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0)
        fd = os.open(path, flags)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_manifest(folder: str | os.PathLike) -> Path:
    """Write `folder/manifest.json` with the size and sha256 of every other file under `folder`. Written last, it
    marks the folder complete: a reader that finds it and every file matching it can trust the folder."""
    folder = Path(folder)
    files = {
        p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    out = folder / MANIFEST
    with open(out, "w", encoding="utf-8") as f:
        f.write(json.dumps({"version": 1, "files": files}, indent=1) + "\n")
    return out


def manifest_problem(folder: str | os.PathLike, *, hashes: bool = True) -> str | None:
    """What is wrong with `folder` by its manifest ("model/model.safetensors: 44844 bytes, the manifest says
    89688"), or None when every listed file matches. A folder without a manifest (written before manifests
    existed) is None too: the caller then trusts it as far as it loads."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.exists():
        return None
    try:
        files = json.loads(path.read_text(encoding="utf-8"))["files"]
        entries = [(name, int(e["size"]), str(e["sha256"])) for name, e in files.items()]
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as exc:
        return f"{MANIFEST} is not a valid manifest ({type(exc).__name__}: {exc})"
    for name, size, _ in entries:  # sizes first: cheap, and they catch a truncated file
        file = folder / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name}: {file.stat().st_size} bytes, the manifest says {size}"
    if hashes:
        for name, _, digest in entries:
            if _sha256(folder / name) != digest:
                return f"{name}: contents differ from the manifest (sha256)"
    return None


def repair_torn_tail(path: str | os.PathLike, *, is_complete=None) -> int:
    """Cut the append-only text file `path` back to its last complete line: a line without its newline, or one that
    is not valid UTF-8 (a kill inside a multi-byte character) or fails `is_complete(text)`, at the end of the file
    is what an interrupted append leaves. Returns the bytes dropped (0: nothing to repair). Only the last line is
    considered: damage further up is real corruption, for the reader to report."""
    path = Path(path)
    if not path.is_file():
        return 0
    data = path.read_bytes()
    keep = len(data)
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
    else:
        last_start = data.rfind(b"\n", 0, max(0, keep - 1)) + 1
        last = data[last_start:keep]
        try:
            text = last.decode("utf-8")
            if is_complete is not None and last.strip() and not is_complete(text):
                keep = last_start
        except UnicodeDecodeError:
            keep = last_start
    if keep == len(data):
        return 0
    with storage_errors("", path):
        with open(path, "r+b") as f:
            f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())
    return len(data) - keep


def json_safe(value):
    """`value` with every non-finite float (NaN, inf) replaced by None, through dicts, lists and tuples."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value
