"""Subprocess that runs math-verify checks, one JSON line in, one JSON line out.

Run as a separate process so the parent can bound every check with a hard timeout and kill the process when
sympy runs away (C-level big-integer work ignores signals). math-verify's own signal timeouts are switched
off here (``parsing_timeout=None``, ``timeout_seconds=None``): the parent owns the clock.
An optional argument caps the worker's address space (bytes).
Protocol: the worker prints ``{"ready": true}`` once imports finish; each request ``{"pred": str, "gt": str}``
gets ``{"ok": bool}`` or ``{"ok": false, "error": str}``. Not imported by the package; started by
``opd.grading.symbolic``.
"""

import json
import logging
import os
import re
import sys


def main() -> None:
    if len(sys.argv) > 1:  # address-space cap: a memory bomb fails fast with MemoryError instead of eating RAM
        import resource

        limit = int(sys.argv[1])
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    proto_out = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    # anything a library prints (Python or C level) goes to stderr, never into the protocol stream
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    sys.stdout = sys.stderr
    logging.disable(logging.WARNING)
    from math_verify import parse, verify

    def wrap(answer: str) -> str:  # an answer that holds its own math delimiters ("$21,16$ or $11$") keeps them
        return answer if re.search(r"(?<!\\)\$", answer) else "$" + answer + "$"

    proto_out.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        try:
            req = json.loads(line)
            gold = parse(wrap(req["gt"]), parsing_timeout=None)
            pred = parse(wrap(req["pred"]), parsing_timeout=None)
            ok = bool(gold) and bool(pred) and verify(gold, pred, timeout_seconds=None)
            reply = {"ok": bool(ok)}
        except Exception as exc:  # a parse/verify failure means "not shown equal"
            reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:300]}
        proto_out.write(json.dumps(reply) + "\n")


if __name__ == "__main__":
    main()
