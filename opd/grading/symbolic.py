"""Symbolic equivalence through math-verify, run in a killable worker process under a hard timeout.

Why a process: math-verify's built-in timeouts use ``signal.alarm`` (main thread only) and cannot interrupt
C-level big-integer arithmetic, so an adversarial answer could hang a grader thread forever. Each
:class:`SymbolicChecker` owns one long-lived worker (started once, ~1 s of imports, never per call); a check
that overruns its timeout kills the worker, counts as "not equal", and the next check starts a fresh one.
:func:`symbolic_equal` uses one checker per calling thread, so it is safe from threads (grade pools, servers).
"""

from __future__ import annotations

import atexit
import json
import os
import select
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path

__all__ = ["SymbolicChecker", "SymbolicTimeout", "symbolic_equal", "DEFAULT_TIMEOUT_S"]

DEFAULT_TIMEOUT_S = 5.0
WORKER_MEMORY_LIMIT = 4 << 30  # bytes of address space per worker; sympy answers need far less
STARTUP_TIMEOUT_S = 120.0  # imports of sympy on a loaded 2-core box can be slow; not part of any check's budget
_WORKER = Path(__file__).with_name("_worker.py")
_LIVE: "weakref.WeakSet[SymbolicChecker]" = weakref.WeakSet()


class SymbolicTimeout(Exception):
    """A check ran past its timeout (the worker was killed)."""


class SymbolicChecker:
    """One math-verify worker process; not thread-safe (use one per thread)."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen | None = None
        self._owner_pid = os.getpid()  # a forked child must not talk to (or kill) its parent's worker
        self._buf = b""
        self.restarts = 0
        _LIVE.add(self)

    def _start(self) -> None:
        # -P: do not put opd/grading/ on sys.path (its module names could shadow others); -u: unbuffered
        self._proc = subprocess.Popen(
            [sys.executable, "-P", "-u", str(_WORKER), str(WORKER_MEMORY_LIMIT)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            bufsize=0,
        )
        self._buf = b""
        reply = self._read_line(STARTUP_TIMEOUT_S)
        if reply is None or not json.loads(reply).get("ready"):
            self.close()
            raise RuntimeError(f"math-verify worker {_WORKER} failed to start (is math-verify installed?)")

    def _read_line(self, timeout: float) -> bytes | None:
        assert self._proc is not None and self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:  # worker died
                return None
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line

    def start(self) -> None:
        """Start the worker now (else the first check does), e.g. off the critical path of a training step."""
        if self._proc is None or self._proc.poll() is not None:
            self._start()

    def check(self, pred: str, gt: str, timeout: float = DEFAULT_TIMEOUT_S) -> bool:
        """True if math-verify shows ``pred`` equal to ``gt``; raises SymbolicTimeout on overrun."""
        if self._owner_pid != os.getpid():  # inherited through fork: start our own worker
            self._proc, self._buf, self._owner_pid = None, b"", os.getpid()
        if self._proc is None or self._proc.poll() is not None:
            if self._proc is not None:
                self.restarts += 1
            self._start()
        assert self._proc is not None and self._proc.stdin is not None
        try:
            self._proc.stdin.write((json.dumps({"pred": pred, "gt": gt}) + "\n").encode())
        except BrokenPipeError:
            self.close()
            return False
        reply = self._read_line(timeout)
        if reply is None:
            self.close()
            raise SymbolicTimeout(f"math-verify check exceeded {timeout:.1f}s (pred {pred[:60]!r})")
        return bool(json.loads(reply).get("ok", False))

    def close(self) -> None:
        """Kill the worker (idempotent)."""
        proc, self._proc = self._proc, None
        if proc is not None and self._owner_pid == os.getpid():
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            for stream in (proc.stdin, proc.stdout):
                if stream is not None:
                    stream.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


_local = threading.local()


def _thread_checker() -> SymbolicChecker:
    checker = getattr(_local, "checker", None)
    if checker is None:
        checker = _local.checker = SymbolicChecker()
    return checker


def symbolic_equal(
    pred: str, gt: str, timeout: float = DEFAULT_TIMEOUT_S, checker: SymbolicChecker | None = None
) -> bool:
    """math-verify equivalence under a hard timeout (raises SymbolicTimeout when it runs past it)."""
    return (checker or _thread_checker()).check(pred, gt, timeout)


@atexit.register
def _close_all() -> None:
    for checker in list(_LIVE):
        checker.close()
