"""Damaged state and changed settings on resume, one test per case: damaged checkpoints (manifest) are skipped or
named, torn trailing lines are cut, a full disk mid-save leaves the earlier state intact, keep_last_n rotates, a
changed lr / MINI_BATCH_SIZE is applied for real and a setting that cannot be applied is refused (tiny CPU models)."""

from __future__ import annotations

import errno
import importlib.util
import json
from pathlib import Path

import pytest

from opd.engines.local import checkpoint as ckpt_mod
from opd.engines.local import trainer
from opd.engines.local.checkpoint import CheckpointError, checkpoints, latest_checkpoint
from opd.engines.local.config import TrainConfig
from opd.engines.local.logging import read_metrics
from opd.engines.local.resume import RESUME_SETTINGS, ResumeError, policy
from opd.io import StorageError, manifest_problem, repair_torn_tail, storage_errors


def _engine_fixtures():
    path = Path(__file__).resolve().parents[1] / "engine" / "conftest.py"
    spec = importlib.util.spec_from_file_location("_engine_conftest", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_engine = _engine_fixtures()
toy_world, tiny_cfg = _engine.toy_world, _engine.tiny_cfg


def _rows(run: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in read_metrics(run)]


def _weights(run: Path, step: int) -> bytes:
    return (run / "checkpoints" / f"step_{step:06d}" / "model" / "model.safetensors").read_bytes()


@pytest.fixture
def four_steps(tiny_cfg, tmp_path):
    """A finished 4-step run with checkpoints at 2 and 4, and a factory for the same configuration elsewhere."""

    def make(name: str, **over):
        return tiny_cfg(output_dir=str(tmp_path / name), total_steps=4, save_freq=2, **over)

    straight = trainer.train(make("ref"))
    return straight, make


# --- damaged checkpoints -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("victim", ["model/model.safetensors", "optimizer.pt"])
def test_truncated_file_in_the_newest_checkpoint_falls_back_and_is_named(four_steps, victim, capsys):
    straight, make = four_steps
    cfg = make("a")
    run = trainer.train(cfg.replace(total_steps=4))
    path = run / "checkpoints" / "step_000004" / victim
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    capsys.readouterr()

    # explicit resume to the damaged one: one line naming the file and the intact older checkpoint
    with pytest.raises(CheckpointError) as info:
        trainer.train(cfg.replace(resume=str(run / "checkpoints" / "step_000004")))
    message = str(info.value)
    assert "\n" not in message and victim in message and "bytes, the manifest says" in message
    assert f"newest intact older checkpoint is {run / 'checkpoints' / 'step_000002'}" in message

    # RESUME=auto: skips it with one line, resumes from step 2 and ends where the uninterrupted run ended
    trainer.train(cfg)
    err = capsys.readouterr().err
    assert f"skipping damaged checkpoint {run / 'checkpoints' / 'step_000004'}: {victim}" in err
    assert _rows(run) == _rows(straight) and _weights(run, 4) == _weights(straight, 4)


def test_corrupt_trainer_state_is_named(four_steps):
    straight, make = four_steps
    cfg = make("a")
    run = trainer.train(cfg)
    state = run / "checkpoints" / "step_000004" / "trainer_state.json"
    state.write_text('{"step": 4, "data_po')
    with pytest.raises(CheckpointError, match="step_000004 is damaged: trainer_state.json: 20 bytes, the manifest"):
        trainer.train(cfg.replace(resume=str(state.parent)))
    (state.parent / "manifest.json").unlink()  # a checkpoint from before manifests: the JSON error names the file
    with pytest.raises(CheckpointError, match=r"step_000004/trainer_state.json is damaged \(JSONDecodeError"):
        trainer.train(cfg.replace(resume=str(state.parent)))


def test_checkpoint_without_manifest_is_trusted_as_far_as_it_loads(four_steps, capsys):
    straight, make = four_steps
    cfg = make("a")
    run = trainer.train(cfg)
    for step in (2, 4):
        (run / "checkpoints" / f"step_{step:06d}" / "manifest.json").unlink()
    weights = run / "checkpoints" / "step_000004" / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"step_000004/model cannot be read .*newest intact older checkpoint"):
        trainer.train(cfg.replace(resume=str(weights.parent.parent)))
    capsys.readouterr()
    trainer.train(cfg)  # auto: the load fails, the older one is used
    assert "skipping damaged checkpoint" in capsys.readouterr().err
    assert _rows(run) == _rows(straight) and _weights(run, 4) == _weights(straight, 4)


def test_manifest_is_written_last_and_lists_every_file(four_steps):
    straight, _ = four_steps
    folder = straight / "checkpoints" / "step_000004"
    listed = json.loads((folder / "manifest.json").read_text())["files"]
    on_disk = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} - {"manifest.json"}
    assert set(listed) == on_disk and {"model/model.safetensors", "optimizer.pt", "rng.pt"} <= on_disk
    assert manifest_problem(folder) is None
    (folder / "rng.pt").write_bytes(b"x" * (folder / "rng.pt").stat().st_size)  # same size, other bytes
    assert manifest_problem(folder) == "rng.pt: contents differ from the manifest (sha256)"


# --- torn trailing lines -----------------------------------------------------------------------------------------


def test_torn_metrics_line_is_cut_on_resume(four_steps, capsys):
    straight, make = four_steps
    cfg = make("a")
    run = trainer.train(cfg.replace(total_steps=2))
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "opd/overlap_ratio": 0.7')
    with open(run / "samples.jsonl", "ab") as f:
        f.write('{"step": 3, "response": "caf\u00e9'.encode()[:-1])  # cut inside a 2-byte character
    capsys.readouterr()
    trainer.train(cfg)
    err = capsys.readouterr().err
    assert f"{run / 'metrics.jsonl'}: removed a torn last line" in err
    assert f"{run / 'samples.jsonl'}: removed a torn last line" in err
    assert _rows(run) == _rows(straight)
    assert (run / "samples.jsonl").read_text() == (straight / "samples.jsonl").read_text()


def test_damaged_line_further_up_is_named(four_steps):
    _, make = four_steps
    cfg = make("a")
    run = trainer.train(cfg.replace(total_steps=2))
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join([lines[0], "{garbage", *lines[1:]]) + "\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl, line 2: not a JSON object"):
        trainer.train(cfg)


def test_repair_torn_tail_keeps_complete_lines(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_bytes(b'{"a": 1}\n{"b": "\xc3\xa9"}\n')
    assert repair_torn_tail(path) == 0
    path.write_bytes(b'{"a": 1}\n{"b": "\xc3')
    assert repair_torn_tail(path) == len(b'{"b": "\xc3') and path.read_bytes() == b'{"a": 1}\n'


def test_rollout_part_cut_inside_a_utf8_character_is_repaired(tmp_path, capsys):
    from opd.data.rollout import read_parts

    good = json.dumps({"prompt_index": 0, "responses": ["r\u00e9sum\u00e9"]}, ensure_ascii=False) + "\n"
    torn = json.dumps({"prompt_index": 1, "responses": ["\u2211 = 5"]}, ensure_ascii=False).encode()
    cut = torn[: torn.index("\u2211".encode()) + 1]  # inside the 3-byte character
    (tmp_path / "worker-0.jsonl").write_bytes(good.encode() + cut)
    records = read_parts(tmp_path)
    assert list(records) == [0] and records[0]["responses"] == ["r\u00e9sum\u00e9"]
    assert "worker-0.jsonl: removed a torn last line" in capsys.readouterr().err
    assert (tmp_path / "worker-0.jsonl").read_bytes() == good.encode()


# --- disk full during a checkpoint --------------------------------------------------------------------------------


def test_disk_full_mid_save_cleans_up_and_keeps_the_earlier_checkpoint(four_steps, monkeypatch):
    straight, make = four_steps
    cfg = make("a")
    real = ckpt_mod._torch_save

    def full_disk(obj, path):
        if path.name == "optimizer.pt" and "step_000004" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, path)

    monkeypatch.setattr(ckpt_mod, "_torch_save", full_disk)
    with pytest.raises(StorageError) as info:
        trainer.train(cfg)
    run = Path(cfg.output_dir) / "t"
    assert str(info.value) == f"no space left on device while writing checkpoint {run / 'checkpoints' / 'step_000004'}"
    assert isinstance(info.value, OSError) and info.value.errno == errno.ENOSPC
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000002"]  # no .tmp- left
    assert manifest_problem(run / "checkpoints" / "step_000002") is None

    monkeypatch.setattr(ckpt_mod, "_torch_save", real)  # space again: the resume ends as the uninterrupted run
    trainer.train(cfg)
    assert _rows(run) == _rows(straight) and _weights(run, 4) == _weights(straight, 4)


def test_stale_tmp_folders_are_removed_at_start(four_steps, capsys):
    _, make = four_steps
    cfg = make("a")
    run = trainer.train(cfg.replace(total_steps=2))
    stale = run / "checkpoints" / ".tmp-step_000004"
    (stale / "model").mkdir(parents=True)
    capsys.readouterr()
    trainer.train(cfg)
    assert f"removed {stale} (a checkpoint save was interrupted)" in capsys.readouterr().err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000002", "step_000004"]


def test_library_storage_errors_become_one_line(tmp_path):
    with pytest.raises(StorageError, match="^no space left on device while writing checkpoint /x$"):
        with storage_errors("checkpoint", "/x"):  # how safetensors words it
            raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")
    with pytest.raises(StorageError, match="^read-only file system while writing /y$"):
        with storage_errors("", "/y"):
            raise OSError(errno.EROFS, "Read-only file system")
    with pytest.raises(StorageError, match="^disk quota exceeded while writing checkpoint /z$"):
        with storage_errors("checkpoint", "/z"):  # torch.save to a path words it "[Errno 122]" in a RuntimeError
            raise RuntimeError("[Errno 122] Disk quota exceeded")
    with pytest.raises(KeyError):  # anything else passes unchanged
        with storage_errors("checkpoint", "/x"):
            raise KeyError("other")


# --- keep_last_n ---------------------------------------------------------------------------------------------------


def test_keep_last_n_rotates_after_the_new_checkpoint_is_complete(tiny_cfg, tmp_path, monkeypatch):
    cfg = tiny_cfg(output_dir=str(tmp_path), total_steps=5, save_freq=1, keep_last_n=2)
    seen = []
    real = ckpt_mod.rotate

    def spy(run_dir, n, *, keep, prog="opd train"):
        assert (keep / "manifest.json").is_file()  # rotation only once the new one is complete
        seen.append([p.name for p in checkpoints(run_dir)])
        return real(run_dir, n, keep=keep, prog=prog)

    monkeypatch.setattr(ckpt_mod, "rotate", spy)
    run = trainer.train(cfg)
    assert seen[-1] == ["step_000005", "step_000004", "step_000003"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000004", "step_000005"]
    ckpt_mod.rotate(run, 1, keep=run / "checkpoints" / "step_000004")  # never the one just written
    assert [p.name for p in checkpoints(run)] == ["step_000005", "step_000004"]
    with pytest.raises(ValueError, match="keep_last_n"):
        tiny_cfg(keep_last_n=-1)


# --- changed settings on resume ------------------------------------------------------------------------------------


def test_every_setting_has_a_resume_rule():
    fields = [k for k in TrainConfig().to_dict() if k != "algo"]
    assert [k for k in fields if k not in RESUME_SETTINGS] == []
    assert policy("algo.top_k")[0] == "apply" and policy("seed")[0] == "refuse"


def test_changed_lr_goes_into_the_optimizer(tiny_cfg, tmp_path, capsys):
    cfg = tiny_cfg(output_dir=str(tmp_path / "a"), total_steps=2, save_freq=1, lr=1e-3)
    trainer.train(cfg.replace(total_steps=1))
    trainer.train(cfg.replace(total_steps=1, output_dir=str(tmp_path / "b")))
    capsys.readouterr()
    changed = trainer.train(cfg.replace(lr=5e-4))
    assert "changed settings (applied): lr: 0.001 -> 0.0005" in capsys.readouterr().err
    same = trainer.train(cfg.replace(output_dir=str(tmp_path / "b")))
    assert read_metrics(changed)[-1]["actor/lr"] == pytest.approx(5e-4)
    assert read_metrics(same)[-1]["actor/lr"] == pytest.approx(1e-3)
    assert _weights(changed, 2) != _weights(same, 2)
    s = trainer.setup(cfg.replace(lr=2e-4, total_steps=3))
    assert s.scheduler.base_lrs == [2e-4] and s.optimizer.param_groups[0]["lr"] == pytest.approx(2e-4)


def test_changed_batch_size_continues_after_the_last_prompt_used(tiny_cfg, tmp_path, capsys):
    cfg = tiny_cfg(output_dir=str(tmp_path), total_steps=2, save_freq=1, mini_batch_size=4)
    first = trainer.setup(cfg)
    used = [i for step in (1, 2) for i in first.schedule.batch(step)]
    trainer.train(cfg)
    capsys.readouterr()
    s = trainer.setup(cfg.replace(mini_batch_size=3, total_steps=4))
    assert "mini_batch_size: 4 -> 3" in capsys.readouterr().err
    perm = first.schedule._perm(0).tolist()
    assert perm[:8] == used
    assert s.schedule.batch(3) == perm[8:11] and s.schedule.batch(4) == perm[11:14]
    trainer.train(cfg.replace(mini_batch_size=3, total_steps=4))
    ckpt = json.loads((latest_checkpoint(tmp_path / "t") / "trainer_state.json").read_text())
    assert ckpt["data_position"]["prompts_in_epoch"] == 14 and ckpt["step"] == 4


def test_a_setting_that_cannot_be_applied_is_refused_by_name(tiny_cfg, toy_world, tmp_path, capsys):
    import shutil

    from opd.toy import write_datasets

    cfg = tiny_cfg(output_dir=str(tmp_path / "runs"), total_steps=2, save_freq=1)
    trainer.train(cfg.replace(total_steps=1))
    with pytest.raises(ResumeError, match=r"with seed changed \(0 -> 3\): it draws the data order"):
        trainer.train(cfg.replace(seed=3))
    other = write_datasets(tmp_path / "other", seed=5, n_train=64, n_dev=4, n_test=4)["train"]
    with pytest.raises(ResumeError, match=r"with train_dataset changed .*the usable prompts differ"):
        trainer.train(cfg.replace(train_dataset=str(other)))
    moved = shutil.copy(toy_world["train"], tmp_path / "moved.parquet")  # same prompts, another path: accepted
    capsys.readouterr()
    trainer.train(cfg.replace(train_dataset=str(moved)))
    err = capsys.readouterr().err
    assert "changed settings (applied): total_steps: 1 -> 2, train_dataset: " in err
