"""Run one `opd` command with event hooks, for the kill tests: `python kill_runner.py EVENTS -- opd-args...`.

Each line of EVENTS names a point the command reached ("step:3", "save:.tmp-step_000004:optimizer.pt",
"sftstep:5", "record:12"), flushed as it happens, so the test can SIGKILL the process right after a chosen point.
KILL_TEST_SAVE_PAUSE (seconds) sleeps after each torch.save inside a checkpoint write, which widens the window in
which a kill lands inside the save. Nothing here changes what the command computes.
"""

from __future__ import annotations

import os
import sys
import time

events = open(sys.argv[1], "a", buffering=1, encoding="utf-8")
pause = float(os.environ.get("KILL_TEST_SAVE_PAUSE", "0"))


def emit(name: str) -> None:
    events.write(name + "\n")
    events.flush()


def install() -> None:
    from opd.data import rollout
    from opd.engines.local import checkpoint, trainer
    from opd.sft import resume

    real_save, real_step, real_after, real_append = (
        checkpoint._torch_save,
        trainer.train_step,
        resume.SFTRun.after_step,
        rollout._append,
    )

    def save(obj, path):
        real_save(obj, path)
        emit(f"save:{path.parent.name}:{path.name}")
        time.sleep(pause)

    def step(s, n):
        emit(f"step:{n}")
        return real_step(s, n)

    def after(self, n, total, **kwargs):
        emit(f"sftstep:{n}")
        return real_after(self, n, total, **kwargs)

    def append(part, record):
        real_append(part, record)
        emit(f"record:{record['prompt_index']}")

    checkpoint._torch_save, trainer.train_step, resume.SFTRun.after_step, rollout._append = save, step, after, append


if __name__ == "__main__":
    assert sys.argv[2] == "--"
    install()
    from opd.cli import main

    raise SystemExit(main(sys.argv[3:]))
