"""``python -m opd.engines.verl.selfcheck``: one line saying what OPD registered in verl, exit 1 if it did not.

Run it with the same environment as the training launch (OPD_VERL, VERL_PLATFORM): the switches decide what
must be registered. ``--rollout`` / ``--platform`` require one regardless of the environment.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m opd.engines.verl.selfcheck", description=__doc__.splitlines()[0])
    parser.add_argument("--rollout", action="store_true", help="require the opd_hf rollout")
    parser.add_argument("--platform", action="store_true", help="require the cpu platform")
    args = parser.parse_args(argv)
    from opd.engines.verl import RegistrationError, registration_status

    try:
        status = registration_status(rollout=args.rollout or None, platform=args.platform or None)
    except RegistrationError as exc:
        print(f"opd verl plugin: NOT OK: {exc}", file=sys.stderr)
        return 1
    parts = [f"verl {status['verl']}", *(f"{key}={status[key]}" for key in ("rollout", "trainer", "platform"))]
    print("opd verl plugin: OK: " + ", ".join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
