"""`opd sft`'s checkpoints (opd.sft.resume.SFTRun) on a tiny model: an interrupted run resumes to the same weights,
a changed lr / batch size is applied, a changed seed or other data is refused by name, a damaged checkpoint is
skipped saying why, and nothing is left beside the output once it is written."""

from __future__ import annotations

import dataclasses

import pytest

from opd.engines.local.checkpoint import checkpoints
from opd.engines.local.resume import ResumeError
from opd.sft.resume import SFTRun, data_fingerprint, partial_dir
from opd.sft.trainer import SFTConfig, encode_dataset, train_sft
from opd.toy import build_tiny_model, build_toy_tokenizer, sample_problems, sft_messages


@pytest.fixture(scope="module")
def world():
    tok = build_toy_tokenizer()
    data = encode_dataset(tok, [r["messages"] for r in sft_messages(sample_problems(40, 0))], max_length=100)
    return tok, data


def _train(world, out, *, crash_after_save=None, resume="auto", **changes):
    tok, data = world
    config = SFTConfig(**{"lr": 1e-2, "steps": 8, "batch_size": 8, "log_every": 1, "progress": False, **changes})
    model = build_tiny_model(tok, "tiny", seed=0)
    fingerprint = data_fingerprint(data.input_ids, data.labels)
    settings = {**dataclasses.asdict(config), "model": "tiny", "data_sha256": fingerprint}
    run = SFTRun(out, tok, settings, save_steps=2, keep_last_n=2, resume=resume)
    run.prepare()
    if crash_after_save is not None:
        real = run.after_step

        def crash(step, total, **kwargs):
            real(step, total, **kwargs)
            if step == crash_after_save:
                raise KeyboardInterrupt("simulated kill")

        run.after_step = crash
    try:
        train_sft(model, data, config, pad_token_id=tok.pad_token_id, run=run)
        run.finish(model)
    finally:
        run.close()
    return (out / "model.safetensors").read_bytes()


def test_interrupted_sft_resumes_to_the_same_weights(world, tmp_path, capsys):
    ref = _train(world, tmp_path / "ref")
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        _train(world, out, crash_after_save=6)
    assert [p.name for p in checkpoints(partial_dir(out))] == ["step_000006", "step_000004"]  # keep_last_n=2
    assert _train(world, out) == ref
    assert "resuming from" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "ref"]  # the work folder is gone


def test_changed_settings_are_applied_or_refused(world, tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        _train(world, out, crash_after_save=4)
    with pytest.raises(ResumeError, match=r"with seed changed \(0 -> 1\): it draws the order"):
        _train(world, out, seed=1)
    capsys.readouterr()
    _train(world, out, lr=5e-3, batch_size=4)
    assert "changed settings (applied): batch_size: 8 -> 4, lr: 0.01 -> 0.005" in capsys.readouterr().err


def test_damaged_sft_checkpoint_is_skipped(world, tmp_path, capsys):
    ref = _train(world, tmp_path / "ref")
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        _train(world, out, crash_after_save=6)
    victim = partial_dir(out) / "checkpoints" / "step_000006" / "optimizer.pt"
    victim.write_bytes(victim.read_bytes()[:100])
    capsys.readouterr()
    assert _train(world, out) == ref
    err = capsys.readouterr().err
    assert f"skipping damaged checkpoint {victim.parent}: optimizer.pt: 100 bytes, the manifest says" in err
