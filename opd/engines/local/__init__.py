"""The local engine: OPD / GRPO training in one process on CPU or one GPU with plain PyTorch + transformers.

`train(TrainConfig(...)) -> run folder` is the Python entry; `opd train` and the launchers
(on_policy_distillation.sh, grpo.sh) are the command-line ones. All OPD maths comes from `opd.core`.
"""

from opd.engines.local.config import TrainConfig


def train(cfg: TrainConfig):
    """Run (or resume) training; returns the run folder (see opd.engines.local.trainer)."""
    from opd.engines.local.trainer import train as _train

    return _train(cfg)


__all__ = ["TrainConfig", "train"]
