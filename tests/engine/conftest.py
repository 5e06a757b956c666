"""Shared fixtures for the local-engine tests: a toy world built in-process (tokenizer, tiny models, parquet)."""

from __future__ import annotations

import pytest

from opd.engines.local.config import TrainConfig, resolve


@pytest.fixture(scope="session")
def toy_world(tmp_path_factory):
    """Paths of a toy tokenizer + tiny student/teacher (different seeds, same vocabulary) + train/test parquet."""
    from opd.toy import build_tiny_model, build_toy_tokenizer, save_model, write_datasets

    root = tmp_path_factory.mktemp("toy_world")
    tok = build_toy_tokenizer(root / "tok")
    student = build_tiny_model(tok, size="tiny", seed=1)
    teacher = build_tiny_model(tok, size="tiny", seed=2)
    paths = write_datasets(root / "data", seed=0, n_train=64, n_dev=4, n_test=4)
    return {
        "root": root,
        "tokenizer": tok,
        "student": save_model(student, tok, root / "student"),
        "teacher": save_model(teacher, tok, root / "teacher"),
        "train": str(paths["train"]),
        "test": str(paths["test"]),
    }


@pytest.fixture
def tiny_cfg(toy_world, tmp_path):
    """A seconds-long OPD configuration on the toy world (override with cfg.replace(...))."""

    def make(**overrides) -> TrainConfig:
        base = {
            "actor_model_path": toy_world["student"],
            "reward_model_path": toy_world["teacher"],
            "train_dataset": toy_world["train"],
            "test_files": [toy_world["test"]],
            "mini_batch_size": 4,
            "n_responses": 2,
            "max_resp_length": 12,
            "max_val_resp_length": 12,
            "val_n": 2,
            "total_steps": 2,
            "test_freq": 0,
            "save_freq": 0,
            "val_before_train": False,
            "lr": 1e-3,
            "output_dir": str(tmp_path / "runs"),
            "run_name": "t",
            "progress": False,
            "algo.top_k": 4,
        }
        base.update(overrides)
        return resolve(None, base)

    return make
