"""The local engine on one CUDA device (skipped without one): a few OPD steps in bf16 and fp32, then a resume."""

from __future__ import annotations

import math

import pytest
import torch

from opd.engines.local import trainer
from opd.engines.local.logging import read_metrics

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_opd_steps_on_cuda(tiny_cfg, dtype):
    run = trainer.train(tiny_cfg(device="cuda", model_dtype=dtype, total_steps=2, save_freq=1, test_freq=2))
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [1, 2]
    assert all(math.isfinite(r["actor/loss"]) and r["actor/grad_norm"] > 0 for r in rows)
    assert "val/mean@2" in rows[-1]


def test_resume_on_cuda_continues_the_run(tiny_cfg, tmp_path):
    cfg = tiny_cfg(device="cuda", total_steps=2, save_freq=1, output_dir=str(tmp_path))
    trainer.train(cfg.replace(total_steps=1))
    run = trainer.train(cfg)  # resumes from step 1 (sampler generator state restored on the device)
    assert [r["step"] for r in read_metrics(run)] == [1, 2]
