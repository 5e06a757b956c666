"""Resident-set readings shared by the benchmark scripts (Linux /proc; None / False elsewhere)."""

from __future__ import annotations


def status_mb(field: str) -> float | None:
    """A /proc/self/status field (VmRSS, VmHWM, ...) in MiB."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def reset_peak() -> bool:
    """Reset the resident-set high-water mark (VmHWM) to the current resident set, so each phase gets its own peak."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False
