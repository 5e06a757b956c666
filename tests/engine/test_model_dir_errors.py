"""A model path that is not a model folder is refused with a message that says what to pass instead."""

from __future__ import annotations

import pytest

from opd.models import require_model_dir


def test_unset_missing_and_checkpoint_folders(tmp_path):
    with pytest.raises(ValueError, match="ACTOR_MODEL_PATH is not set.*opd demo"):
        require_model_dir(None, "ACTOR_MODEL_PATH", "student")
    with pytest.raises(FileNotFoundError, match=r"REWARD_MODEL_PATH=.*nope: expected .*config\.json \(nothing"):
        require_model_dir(str(tmp_path / "nope"), "REWARD_MODEL_PATH", "teacher")
    ckpt = tmp_path / "step_000150"
    (ckpt / "model").mkdir(parents=True)
    (ckpt / "model" / "config.json").write_text('{"model_type": "llama"}')
    (ckpt / "model" / "tokenizer.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"config\.json; .*step_000150/model is one"):
        require_model_dir(str(ckpt), "--student", "student")
    assert require_model_dir(str(ckpt / "model"), "--student", "student") == ckpt / "model"
