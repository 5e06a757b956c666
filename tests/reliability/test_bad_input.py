"""Bad input to every `opd` command: one line `opd <cmd>: ...` naming the input, a non-zero exit status, no
traceback, nothing half-written left behind (docs/reliability.md, "Bad input"; the cases of the 2026-12-02
reliability review, numbered as there where they have a number).

Each case calls `opd.cli.main` in-process (the launcher cases run the .sh scripts), on a toy tokenizer and tiny
models built once for the module. Exit status 2 means the command line is wrong (an option, a setting); 1 that an
input or the environment is (a file, a model folder, a read-only disk). CPU only; nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest

from opd.cli import main as opd_main
from opd.engines.local.config import ENV_VARS

ROOT = Path(__file__).resolve().parents[2]
MULTI_WORD = ("eval", "data")


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A toy tokenizer, tiny student / teacher, train / test parquet, and the broken inputs the cases read."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from opd.toy import build_tiny_model, build_toy_tokenizer, sample_problems, save_model, sft_messages, write_datasets

    root = tmp_path_factory.mktemp("bad_input")
    tok = build_toy_tokenizer(root / "tok")
    w = {"root": root, "tokenizer": root / "tok"}
    w["student"] = Path(save_model(build_tiny_model(tok, size="tiny", seed=1), tok, root / "student"))
    w["teacher"] = Path(save_model(build_tiny_model(tok, size="tiny", seed=2), tok, root / "teacher"))
    paths = write_datasets(root / "data", seed=0, n_train=16, n_dev=2, n_test=4)
    w["train"], w["test"] = paths["train"], paths["test"]
    rows = pq.read_table(w["train"]).to_pylist()

    # a training checkpoint: the model one level down, beside the optimiser state
    ckpt = root / "run" / "checkpoints" / "step_000002"
    shutil.copytree(w["student"], ckpt / "model")
    (ckpt / "optimizer.pt").write_bytes(b"")
    w["checkpoint"] = ckpt

    wide = build_tiny_model(tok, size="tiny", seed=3)
    wide.resize_token_embeddings(len(tok) + 27)  # 27 output rows the teacher does not have (review case 2)
    w["wide_student"] = Path(save_model(wide, tok, root / "wide_student"))
    other_tok = build_toy_tokenizer(vocab_size=120)  # fewer BPE merges: another vocabulary (review case 1)
    w["other_teacher"] = Path(save_model(build_tiny_model(other_tok, size="tiny", seed=4), other_tok, root / "other"))

    bad = root / "bad"
    bad.mkdir()
    (bad / "fake_model").mkdir()
    (bad / "fake_model" / "config.json").write_text("{}")
    (bad / "not_a_model").mkdir()
    (bad / "zero.parquet").write_bytes(b"")
    (bad / "text.parquet").write_text("question,answer\n1+1,2\n")

    def parquet(name: str, table_rows: list[dict]) -> Path:
        pq.write_table(pa.Table.from_pylist(table_rows), bad / name)
        return bad / name

    w["no_reward"] = parquet("no_reward.parquet", [{k: v for k, v in r.items() if k != "reward_model"} for r in rows])
    w["prompt_int"] = parquet("prompt_int.parquet", [{**r, "prompt": 5} for r in rows])
    w["truth_int"] = parquet(
        "truth_int.parquet", [{**r, "reward_model": {"ground_truth": 5, "style": "rule"}} for r in rows]
    )
    pq.write_table(pq.read_table(w["train"]).slice(0, 0), bad / "empty_rows.parquet")
    w["empty_rows"] = bad / "empty_rows.parquet"
    w["wrong_columns"] = parquet("wrong_columns.parquet", [{"foo": 1, "bar": "x"}])
    long_text = " ".join(["What is 123 + 456?"] * 40)
    w["some_long"] = parquet(
        "some_long.parquet",
        [{**r, "prompt": [{"role": "user", "content": long_text}]} if i < 4 else r for i, r in enumerate(rows)],
    )

    def text(name: str, body: str) -> Path:
        (bad / name).write_text(body, encoding="utf-8")
        return bad / name

    w["bench_badline"] = text("bench_badline.jsonl", '{"problem": "1+1", "answer": "2"}\n{"problem": "2+2", "answ\n')
    w["bench_empty"] = text("bench_empty.jsonl", "")
    w["prep_badline"] = text(
        "dapo_badline.jsonl", '{"question": "a", "final_answer": "1"}\n{"question": "b" "final_answer": "2"}\n'
    )
    w["prep_numeric"] = text(
        "numeric.jsonl", '{"question": "What is 2+2?", "final_answer": "4"}\n{"question": 12345, "final_answer": "1"}\n'
    )
    w["prep_list"] = text("list.jsonl", '{"question": ["a", "b"], "final_answer": "1"}\n')
    w["prep_nocol"] = text("bench_nocol.jsonl", '{"problem": "1+1"}\n')
    w["prep_ok"] = text("ok.jsonl", '{"question": "What is 2+2?", "final_answer": "4"}\n')

    good = [json.dumps(r) for r in sft_messages(sample_problems(4, 0))]
    w["sft_good"] = text("sft_good.jsonl", "\n".join(good) + "\n")
    w["sft_bad"] = text("sft_bad.jsonl", good[0] + "\n" + good[1] + '\n{"messages": [}\n')
    w["sft_roles"] = text(
        "sft_roles.jsonl",
        json.dumps({"messages": [{"role": "assistant", "content": "4"}, {"role": "user", "content": "2+2?"}]}) + "\n",
    )
    w["sft_nokey"] = text("sft_nokey.jsonl", '{"conversation": []}\n')

    gen = bad / "gen"
    gen.mkdir()
    w["gen_badline"] = gen / "badline"
    w["gen_badline"].mkdir()
    (w["gen_badline"] / "x.jsonl").write_text(
        '{"example_id": 0, "sample_idx": 0, "answer": "1", "response": "1"}\n{"example_id": 1, "sam\x01ple"}\n'
    )
    w["gen_nofield"] = gen / "nofield"
    w["gen_nofield"].mkdir()
    (w["gen_nofield"] / "x.jsonl").write_text('{"sample_idx": 0, "answer": "1", "response": "1"}\n')
    w["gen_empty_dir"] = gen / "empty"
    w["gen_empty_dir"].mkdir()

    run = bad / "run_torn"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "a": 1}\n{"step": 2, "a": \n{"step": 3, "a": 1}\n')
    w["run_torn"] = run
    (bad / "run_empty").mkdir()
    (bad / "run_empty" / "metrics.jsonl").write_text("")
    w["run_empty"] = bad / "run_empty"
    w["run_ok"] = bad / "run_ok"
    w["run_ok"].mkdir()
    (w["run_ok"] / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "opd/overlap_ratio": 0.5, "opd/reverse_kl": 1.0}) + "\n" for s in (1, 2))
    )
    return w


@pytest.fixture(autouse=True)
def no_launcher_variables(monkeypatch):
    """Cases set the launcher variables they need; none leaks in from the shell running the tests."""
    for var in [*ENV_VARS, "OPD_DEBUG", "ENGINE", "PRESET"]:
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(scope="module")
def read_only_dir(tmp_path_factory):
    """A folder on a read-only file system (a tmpfs mounted ro): root ignores chmod, not a read-only mount."""
    folder = tmp_path_factory.mktemp("ro")
    (folder / "inside").mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(folder / "inside")], capture_output=True, text=True
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here ({proc.stderr.strip()})")
    yield folder / "inside"
    subprocess.run(["umount", str(folder / "inside")], check=False)


# --------------------------------------------------------------------------- helpers


def prog_of(argv: list[str]) -> str:
    return "opd " + " ".join(argv[:2] if argv[0] in MULTI_WORD else argv[:1])


def run(argv, capsys) -> tuple[int, str, str]:
    argv = [str(a) for a in argv]
    code = opd_main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def refused(argv, capsys, *needles: str, rc: int = 1, absent=()) -> str:
    """Run `argv`; assert the exit status, one error line naming `needles`, no traceback, no partial output."""
    argv = [str(a) for a in argv]
    code, _, err = run(argv, capsys)
    assert "Traceback" not in err, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert lines, f"no message on stderr (exit status {code})"
    last = lines[-1]
    prog = prog_of(argv)
    assert last.startswith(f"{prog}: "), err
    assert sum(line.startswith(f"{prog}: ") for line in lines) == 1, err  # the error is the one such line
    for needle in needles:
        assert str(needle) in last, (needle, last)
    assert code == rc, (code, last)
    for path in absent:
        assert not Path(path).exists(), f"{path} was left behind"
    return last


def train_args(w, tmp_path, **settings) -> list[str]:
    """`opd train` key=value settings of a seconds-long run on the toy world, with `settings` on top."""
    base = {
        "actor_model_path": w["student"],
        "reward_model_path": w["teacher"],
        "train_dataset": w["train"],
        "test_files": w["test"],
        "max_prompt_length": 64,
        "mini_batch_size": 4,
        "n_responses": 2,
        "max_resp_length": 8,
        "max_val_resp_length": 8,
        "val_n": 1,
        "total_steps": 1,
        "test_freq": 0,
        "save_freq": 0,
        "val_before_train": "false",
        "output_dir": tmp_path / "runs",
        "run_name": "t",
        "progress": "false",
        "algo.top_k": 4,
    }
    base.update(settings)
    return ["train", *(f"{k}={v}" for k, v in base.items())]


def launcher(script: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ENV_VARS and k not in ("ENGINE", "PRESET", "OPD_DEBUG")}
    clean["PYTHON"] = sys.executable
    return subprocess.run(
        ["bash", str(ROOT / script), *args], env={**clean, **env}, capture_output=True, text=True, timeout=120
    )


# --------------------------------------------------------------------------- opd train: settings (exit 2)

SETTING_CASES = [
    # review 19: unknown names in the launcher variables
    ({"TOP_K_STRATEGY": "bogus"}, ["launcher variable TOP_K_STRATEGY='bogus'", "allowed: only_stu"]),
    ({"REWARD_WEIGHT_MODE": "bogus"}, ["launcher variable REWARD_WEIGHT_MODE='bogus'", "allowed:"]),
    ({"ADV_ESTIMATOR": "bogus"}, ["launcher variable ADV_ESTIMATOR='bogus'", "allowed:"]),
    # review 21
    ({"LOG_PROB_TOP_K": "abc"}, ["LOG_PROB_TOP_K='abc'", "expected int"]),
    ({"LOG_PROB_TOP_K": "16.5"}, ["LOG_PROB_TOP_K='16.5'", "expected int"]),
    ({"LOG_PROB_TOP_K": "-5"}, ["LOG_PROB_TOP_K='-5'", "-1 for full vocabulary"]),
    # review 22
    ({"N_RESPONSES": "0"}, ["N_RESPONSES='0'", "TrainConfig.n_responses=0 is not valid"]),
    ({"VAL_N": "0"}, ["VAL_N='0'", "TrainConfig.val_n=0"]),
    ({"MAX_RESP_LENGTH": "0"}, ["MAX_RESP_LENGTH='0'", "TrainConfig.max_resp_length=0"]),
    ({"ROLLOUT_BATCH_SIZE": "0"}, ["ROLLOUT_BATCH_SIZE='0'", "TrainConfig.rollout_batch_size=0"]),
    # review 23 / 24: lr must be a finite value > 0 (inf used to crash at step 2)
    ({"LR": "-1"}, ["LR='-1'", "expected a finite value > 0"]),
    ({"LR": "nan"}, ["LR='nan'", "expected a finite value > 0"]),
    ({"LR": "inf"}, ["LR='inf'", "TrainConfig.lr=inf is not valid; expected a finite value > 0"]),
    # review 26
    ({"USE_KL": "maybe"}, ["USE_KL='maybe'", "expected bool"]),
    ({"TEMPERATURE": "0"}, ["TEMPERATURE='0'", "OPDConfig.temperature"]),
    ({"TOP_P": "2"}, ["TOP_P='2'", "a value in (0, 1]"]),
    ({"MODEL_DTYPE": "fp8"}, ["MODEL_DTYPE='fp8'", "fp32 | bf16"]),
    ({"LOSS_AGG_MODE": "sum"}, ["LOSS_AGG_MODE='sum'", "allowed:"]),
    ({"LR_SCHEDULER": "linear"}, ["LR_SCHEDULER='linear'", "constant | cosine"]),
    ({"TOTAL_STEPS": "abc"}, ["TOTAL_STEPS='abc'", "expected int"]),
    # review 31: GRPO with one response per prompt has no learning signal
    (
        {"ADV_ESTIMATOR": "grpo", "LOG_PROB_TOP_K": "0", "N_RESPONSES": "1"},
        ["N_RESPONSES='1'", "a group of one response has advantage 0"],
    ),
    # review 32: the refusal reports the final value and the variable that set it
    ({"ADV_ESTIMATOR": "grpo", "LOG_PROB_TOP_K": "5"}, ["LOG_PROB_TOP_K='5'", "(LOG_PROB_TOP_K)=5; set it to 0"]),
]


@pytest.mark.parametrize("env, needles", SETTING_CASES, ids=lambda v: ",".join(v) if isinstance(v, dict) else None)
def test_train_refuses_a_bad_launcher_variable(env, needles, monkeypatch, capsys, tmp_path):
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    refused(["train", "--from-env", "--print-config"], capsys, *needles, rc=2, absent=[tmp_path / "runs"])


YAML_CASES = [
    ("algo:\n  top_k_strategy: bogus\n", ["top_k_strategy='bogus' is not valid"]),  # review 20
    ("lr_rate: 0.1\n", ["unknown setting 'lr_rate'"]),  # review 27
    ("lr: [1, 2\n", ["line 2 column 1: not valid YAML", "expected ',' or ']'"]),  # review 28
    ("- lr\n- 1\n", ["expected a mapping of settings at the top level, got list"]),
    ("preset: nosuch\n", ["nosuch"]),
]


@pytest.mark.parametrize("text, needles", YAML_CASES, ids=["bad-enum", "typo-key", "broken-syntax", "list", "preset"])
def test_train_refuses_a_bad_config_file(text, needles, tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    refused(["train", "--config", cfg, "--print-config"], capsys, f"config file {cfg}", *needles, rc=2)


def test_train_refuses_bad_key_value_and_a_missing_config_file(tmp_path, capsys):
    refused(["train", "lr_rate=1", "--print-config"], capsys, "unknown setting 'lr_rate'", rc=2)  # review 27
    refused(["train", "lr", "--print-config"], capsys, "expected key=value, got 'lr'", rc=2)
    refused(["train", "--config", tmp_path / "nope.yaml"], capsys, f"{tmp_path / 'nope.yaml'} does not exist", rc=2)


def test_a_setting_split_across_layers_is_validated_once(tmp_path, capsys):
    """Review 32 / §3.1: grpo + top_k 0 set in different layers is a valid final configuration."""
    proc = launcher("grpo.sh", "--print-config", LOG_PROB_TOP_K="0")
    assert proc.returncode == 0 and "top_k: 0" in proc.stdout, proc.stderr
    proc = launcher("on_policy_distillation.sh", "algo.top_k=0", "--print-config", ADV_ESTIMATOR="grpo")
    assert proc.returncode == 0 and "adv_estimator: grpo" in proc.stdout, proc.stderr
    cfg = tmp_path / "g.yaml"
    cfg.write_text("algo:\n  adv_estimator: grpo\n")
    code, out, err = run(["train", "--config", cfg, "algo.top_k=0", "--print-config"], capsys)
    assert code == 0 and "top_k: 0" in out, err


def test_the_launcher_refuses_in_one_line():
    proc = launcher("grpo.sh", "--print-config", LOG_PROB_TOP_K="5")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "opd train: launcher variable LOG_PROB_TOP_K='5': OPDConfig.adv_estimator='grpo' uses no teacher, but "
        "OPDConfig.top_k (LOG_PROB_TOP_K)=5; set it to 0"
    ]


# --------------------------------------------------------------------------- opd train: inputs (exit 1)


def _model_cases(w):
    return {
        "missing": ("actor_model_path", "/nonexistent/model", ["ACTOR_MODEL_PATH=/nonexistent/model", "config.json"]),
        "not-a-model": ("actor_model_path", w["root"] / "bad" / "not_a_model", ["expected a local Hugging Face"]),
        "empty-config": ("actor_model_path", w["root"] / "bad" / "fake_model", ["names no model_type"]),
        "checkpoint": ("actor_model_path", w["checkpoint"], [f"{w['checkpoint'] / 'model'} is one"]),
        "other-vocab": ("reward_model_path", w["other_teacher"], ["do not share a vocabulary"]),
        "wider-student": ("actor_model_path", w["wide_student"], ["wider than the teacher's", "vocab_size 300"]),
    }


@pytest.mark.parametrize(
    "case", ["missing", "not-a-model", "empty-config", "checkpoint", "other-vocab", "wider-student"]
)
def test_train_refuses_a_bad_model_folder(case, world, tmp_path, capsys):
    """Review 1-5 (and the checkpoint hint): refused before any weights load, no run folder."""
    key, value, needles = _model_cases(world)[case]
    refused(train_args(world, tmp_path, **{key: value}), capsys, *needles, absent=[tmp_path / "runs" / "t"])


def _data_cases(w):
    return {
        "no-reward-column": ("train_dataset", w["no_reward"], ["column 'reward_model'", "missing column"]),
        "prompt-int": ("train_dataset", w["prompt_int"], ["row 0, column 'prompt'", "got int"]),
        "truth-int": ("train_dataset", w["truth_int"], ["row 0, column 'reward_model'", "'ground_truth': 5"]),
        "zero-rows": ("train_dataset", w["empty_rows"], [str(w["empty_rows"]), "the file has no rows"]),
        "zero-bytes": ("train_dataset", w["root"] / "bad" / "zero.parquet", ["not a readable parquet file"]),
        "text-parquet": ("train_dataset", w["root"] / "bad" / "text.parquet", ["not a readable parquet file"]),
        "missing-test-file": ("test_files", w["root"] / "nope.parquet", ["nope.parquet does not exist"]),
        "all-too-long": ("max_prompt_length", 1, ["no usable prompt", "max_prompt_length=1"]),
        "batch-too-big": ("mini_batch_size", 1000, ["fewer than MINI_BATCH_SIZE=1000"]),
    }


@pytest.mark.parametrize(
    "case",
    [
        "no-reward-column",
        "prompt-int",
        "truth-int",
        "zero-rows",
        "zero-bytes",
        "text-parquet",
        "missing-test-file",
        "all-too-long",
        "batch-too-big",
    ],
)
def test_train_refuses_bad_prompt_data(case, world, tmp_path, capsys):
    """Review 8-12, 18, 30."""
    key, value, needles = _data_cases(world)[case]
    refused(train_args(world, tmp_path, **{key: value}), capsys, *needles)


def test_train_refuses_cuda_on_a_torch_without_it(world, tmp_path, capsys, monkeypatch):
    """Review 29: one line, not torch's AssertionError from the first .to()."""
    import torch

    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: False)
    refused(train_args(world, tmp_path, device="cuda"), capsys, "device 'cuda'", "built without CUDA")


def test_train_refuses_k_wider_than_the_vocabulary(world, tmp_path, capsys):
    """Review 25."""
    refused(
        train_args(world, tmp_path, **{"algo.top_k": 100000}), capsys, "LOG_PROB_TOP_K=100000 exceeds the vocabulary"
    )


def test_train_drops_too_long_prompts_and_says_so(world, tmp_path, capsys):
    """Review 17 (ends well): 4 long prompts dropped and counted, the run goes on."""
    code, out, err = run(train_args(world, tmp_path, train_dataset=world["some_long"]), capsys)
    assert code == 0, err
    assert "dropped 4 prompts longer than MAX_PROMPT_LENGTH=64 tokens; kept 12" in err
    assert (tmp_path / "runs" / "t" / "metrics.jsonl").is_file()


# --------------------------------------------------------------------------- opd eval gen


def gen_args(model, bench, out, *extra) -> list:
    return ["eval", "gen", "--model", model, "--benchmark", bench, "--out", out, "--n", "1", "--max-tokens", "4",
            "--limit", "1", "--backend", "transformers", "--device", "cpu", "--no-progress", *extra]  # fmt: skip


def test_eval_gen_refuses_missing_and_non_model_folders(world, tmp_path, capsys):
    """Review 6 / 7: no hub "Repo id" traceback, no output folder."""
    out = tmp_path / "ev"
    refused(gen_args("/nonexistent", world["test"], out), capsys, "--model /nonexistent: no such folder", absent=[out])
    bad = world["root"] / "bad" / "not_a_model"
    refused(gen_args(bad, world["test"], out), capsys, f"--model {bad}: not a model folder", absent=[out])
    fake = world["root"] / "bad" / "fake_model"
    refused(
        gen_args(fake, world["test"], out), capsys, f"--model {fake}: config.json names no model_type", absent=[out]
    )


def test_eval_gen_reads_a_checkpoint_folders_model(world, tmp_path, capsys):
    """Review 15 (the README form): a checkpoint folder is read from its model/."""
    code, out, err = run(gen_args(world["checkpoint"], world["test"], tmp_path / "ev"), capsys)
    assert code == 0, err
    (written,) = (tmp_path / "ev").glob("*.jsonl")
    assert "step_000002-model" in written.name and len(written.read_text().splitlines()) == 1


@pytest.mark.parametrize("case", ["unknown-name", "wrong-columns", "malformed-jsonl", "text-parquet", "no-rows"])
def test_eval_gen_refuses_a_bad_benchmark(case, world, tmp_path, capsys):
    """Review 49."""
    bad = world["root"] / "bad"
    spec, data_dir, needles = {
        "unknown-name": ("nosuch", bad, ["benchmark 'nosuch' is neither a file nor a name in", "available:"]),
        "wrong-columns": (world["wrong_columns"], None, ["wrong_columns.parquet", "are neither the RL schema"]),
        "malformed-jsonl": (world["bench_badline"], None, ["bench_badline.jsonl', row 1", "invalid JSON on line 2"]),
        "text-parquet": (bad / "text.parquet", None, ["text.parquet", "not a readable parquet file"]),
        "no-rows": (world["bench_empty"], None, ["bench_empty.jsonl", "no rows"]),
    }[case]
    extra = ["--data-dir", data_dir] if data_dir else []
    out = tmp_path / "ev"
    refused(gen_args(world["student"], spec, out, *extra), capsys, *needles, absent=[out])


def test_eval_gen_refuses_bad_options(world, tmp_path, capsys):
    """Review 50."""
    out = tmp_path / "ev"
    refused(gen_args(world["student"], world["test"], out, "--n", "0"), capsys, "invalid --n 0", rc=2, absent=[out])


def test_eval_gen_refuses_a_read_only_output_folder(world, read_only_dir, capsys):
    """Review 46."""
    out = read_only_dir / "ev"
    refused(gen_args(world["student"], world["test"], out), capsys, "read-only file system", str(out))


# --------------------------------------------------------------------------- opd eval grade


@pytest.mark.parametrize("case", ["malformed-jsonl", "missing-field", "empty-folder", "missing-folder"])
def test_eval_grade_refuses_bad_generation_files(case, world, tmp_path, capsys):
    """Review 47 / 48: the DataErrors of opd eval grade are one line too."""
    path, needles = {
        "malformed-jsonl": (world["gen_badline"], ["x.jsonl", "line 2: invalid JSON"]),
        "missing-field": (world["gen_nofield"], ["x.jsonl", "line 1: missing field 'example_id'"]),
        "empty-folder": (world["gen_empty_dir"], ["folder holds no .jsonl files"]),
        "missing-folder": (tmp_path / "nope", ["no such file or folder"]),
    }[case]
    out = tmp_path / "results.json"
    refused(["eval", "grade", path, "--output", out, "--workers", "1", "--no-progress"], capsys, *needles, absent=[out])


# --------------------------------------------------------------------------- opd data prepare


@pytest.mark.parametrize(
    "case", ["malformed-jsonl", "numeric-question", "list-question", "no-layout", "no-rows", "missing"]
)
def test_data_prepare_refuses_bad_input(case, world, tmp_path, capsys):
    """Review 13-15; a numeric question used to become the string "12345" without a word."""
    path, needles = {
        "malformed-jsonl": (world["prep_badline"], ["dapo_badline.jsonl', row 1", "invalid JSON on line 2"]),
        "numeric-question": (
            world["prep_numeric"],
            ["numeric.jsonl', row 1, column 'question'", "expected a string, got int '12345'"],
        ),
        "list-question": (world["prep_list"], ["list.jsonl', row 0, column 'question'", "expected a string, got list"]),
        "no-layout": (world["prep_nocol"], ["cannot tell the layout from columns ['problem']"]),
        "no-rows": (world["bench_empty"], ["bench_empty.jsonl", "the file has no rows"]),
        "missing": (tmp_path / "nope.jsonl", ["nope.jsonl", "no such file or folder"]),
    }[case]
    out = tmp_path / "out.parquet"
    refused(["data", "prepare", "--input", path, "--output", out, "--no-progress"], capsys, *needles, absent=[out])


def test_data_prepare_creates_a_missing_output_folder(world, tmp_path, capsys):
    """Review 16 (ends well)."""
    out = tmp_path / "no" / "such" / "dir" / "out.parquet"
    code, _, err = run(["data", "prepare", "--input", world["prep_ok"], "--output", out, "--no-progress"], capsys)
    assert code == 0 and out.is_file(), err


def test_data_prepare_refuses_a_read_only_output(world, read_only_dir, capsys):
    """Review 46."""
    out = read_only_dir / "out.parquet"
    argv = ["data", "prepare", "--input", world["prep_ok"], "--output", out, "--no-progress"]
    refused(argv, capsys, "read-only file system", str(out))


# --------------------------------------------------------------------------- opd sft


def sft_args(w, data, out, *extra) -> list:
    return ["sft", "--model", w["student"], "--data", data, "--output", out, "--steps", "1", "--batch-size", "2",
            "--device", "cpu", *extra]  # fmt: skip


@pytest.mark.parametrize("case", ["malformed-jsonl", "assistant-first", "no-messages", "too-long", "missing-data"])
def test_sft_refuses_bad_conversations(case, world, tmp_path, capsys):
    """Review 53-56; an assistant-first conversation used to end in IndexError, --max-length 5 in a traceback."""
    data, extra, needles = {
        "malformed-jsonl": (world["sft_bad"], [], ["sft_bad.jsonl', row 2", "invalid JSON on line 3"]),
        "assistant-first": (
            world["sft_roles"],
            [],
            ["sft_roles.jsonl', row 0, column 'messages'", "turn 0 is a 'assistant'"],
        ),
        "no-messages": (world["sft_nokey"], [], ["sft_nokey.jsonl', row 0, column 'messages'", "no 'messages'"]),
        "too-long": (world["sft_good"], ["--max-length", "5"], ["sft_good.jsonl", "no conversation fits max_length=5"]),
        "missing-data": (tmp_path / "nope.jsonl", [], ["nope.jsonl: no such file"]),
    }[case]
    out = tmp_path / "sft_out"
    refused(sft_args(world, data, out, *extra), capsys, *needles, absent=[out, tmp_path / "sft_out.partial"])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".sft_out")]


def test_sft_refuses_bad_options_and_models(world, tmp_path, capsys):
    """Review 6 and 55: an existing output and a bad lr are usage errors (2); a missing model is an input error."""
    out = tmp_path / "sft_out"
    refused(sft_args(world, world["sft_good"], out, "--lr", "-1"), capsys, "SFTConfig.lr=-1.0", rc=2, absent=[out])
    argv = sft_args(world, world["sft_good"], out)
    argv[argv.index("--model") + 1] = "/nonexistent"
    refused(argv, capsys, "--model /nonexistent: no such folder", absent=[out])
    out.mkdir()
    refused(sft_args(world, world["sft_good"], out), capsys, f"--output {out} already exists", rc=2)


def test_sft_refuses_a_read_only_output_before_training(world, read_only_dir, capsys):
    """Review 46."""
    out = read_only_dir / "sft_out"
    refused(sft_args(world, world["sft_good"], out), capsys, "read-only file system", str(out))


def test_lab_refuses_a_read_only_folder_before_training(read_only_dir, capsys):
    out = read_only_dir / "lab"
    refused(["lab", "--tiny", "--out", str(out)], capsys, "read-only file system", str(out), "--out")


# --------------------------------------------------------------------------- opd rollout


def rollout_args(model, data, out) -> list:
    return ["rollout", "--input", data, "--model", model, "--output", out, "--max-tokens", "4", "--limit", "2",
            "--backend", "transformers", "--device", "cpu", "--no-progress"]  # fmt: skip


def test_rollout_refuses_a_missing_model_and_leaves_no_parts(world, tmp_path, capsys):
    """Review 6: the .parts folder used to be left behind."""
    out = tmp_path / "a.jsonl"
    refused(
        rollout_args("/nonexistent", world["train"], out),
        capsys,
        "--model /nonexistent: no such folder",
        absent=[out, tmp_path / "a.jsonl.parts"],
    )


@pytest.mark.parametrize("case", ["text-parquet", "no-prompt-column"])
def test_rollout_refuses_a_bad_prompt_file(case, world, tmp_path, capsys):
    """Review 61."""
    data, needles = {
        "text-parquet": (world["root"] / "bad" / "text.parquet", ["text.parquet", "not a readable parquet file"]),
        "no-prompt-column": (
            world["wrong_columns"],
            ["wrong_columns.parquet", "missing column(s) ['data_source', 'prompt'"],
        ),
    }[case]
    out = tmp_path / "a.jsonl"
    refused(rollout_args(world["teacher"], data, out), capsys, *needles, absent=[out, tmp_path / "a.jsonl.parts"])


def test_rollout_refuses_a_read_only_output(world, read_only_dir, capsys):
    """Review 46."""
    out = read_only_dir / "a.jsonl"
    refused(rollout_args(world["teacher"], world["train"], out), capsys, "read-only file system")


# --------------------------------------------------------------------------- export-llamafactory, dedup, report


def test_export_llamafactory_refuses_bad_input_and_copies_nothing(world, tmp_path, capsys):
    """Review 62; an invalid dataset_info.json used to leave the rollouts copied into the dataset folder."""
    ds = tmp_path / "ds"
    argv = ["data", "export-llamafactory", "--rollouts", world["sft_bad"], "--dataset-dir", ds]
    refused(argv, capsys, "sft_bad.jsonl', row 2", "line 3 is not JSON", absent=[ds])
    argv = ["data", "export-llamafactory", "--rollouts", tmp_path / "nope.jsonl", "--dataset-dir", ds]
    refused(argv, capsys, "nope.jsonl", "no such file", absent=[ds])
    ds.mkdir()
    (ds / "dataset_info.json").write_text("{broken")
    argv = ["data", "export-llamafactory", "--rollouts", world["sft_good"], "--dataset-dir", ds]
    refused(argv, capsys, "dataset_info.json", "is not valid JSON", absent=[ds / "sft_good.jsonl"])


def test_dedup_refuses_bad_input(world, tmp_path, capsys):
    """Review 63."""
    out = tmp_path / "d.parquet"
    base = ["data", "dedup", "--exact-only", "--output", out, "--no-progress"]
    refused(
        [*base, "--source", world["train"], "--against", tmp_path / "nope.parquet"],
        capsys,
        "nope.parquet",
        "no such file",
        absent=[out],
    )
    text = world["root"] / "bad" / "text.parquet"
    refused([*base, "--source", text, "--against", world["test"]], capsys, "not a readable parquet file", absent=[out])
    argv = [*base, "--source", world["train"], "--against", world["test"], "--threshold", "5"]
    refused(argv, capsys, "--threshold must be a cosine in [-1, 1], got 5.0", rc=2, absent=[out])


@pytest.mark.parametrize("case", ["not-a-run", "torn-line", "empty"])
def test_report_refuses_bad_metrics(case, world, tmp_path, capsys):
    """Review 64."""
    run_dir, needles = {
        "not-a-run": (tmp_path / "nope", ["metrics.jsonl: not found"]),
        "torn-line": (world["run_torn"], ["metrics.jsonl:2: not valid JSON"]),
        "empty": (world["run_empty"], ["metrics.jsonl: no rows"]),
    }[case]
    out = tmp_path / "rep"
    refused(["report", run_dir, "--out", out], capsys, *needles, absent=[out])


def test_report_refuses_a_read_only_output(world, read_only_dir, capsys):
    """Review 46."""
    refused(["report", world["run_ok"], "--out", read_only_dir / "rep"], capsys, "read-only file system")


# --------------------------------------------------------------------------- opd check


def check_args(w, **over) -> list:
    args = {"--student": w["student"], "--teacher": w["teacher"], "--data": w["train"], "--n-prompts": "2"}
    args.update(over)
    return ["check", *(x for kv in args.items() for x in kv), "--no-progress"]


@pytest.mark.parametrize("case", ["other-vocab", "wider-student", "missing-data", "k-too-big"])
def test_check_refuses_bad_input(case, world, tmp_path, capsys):
    """Review 65 (and 2: the wider student is caught by the vocabulary check, before any compute)."""
    over, needles = {
        "other-vocab": ({"--teacher": world["other_teacher"]}, ["do not share a vocabulary"]),
        "wider-student": ({"--student": world["wide_student"]}, ["wider than the teacher's"]),
        "missing-data": ({"--data": tmp_path / "nope.parquet"}, ["nope.parquet does not exist"]),
        "k-too-big": ({"--k": "100000"}, ["--k=100000 exceeds the vocabulary"]),
    }[case]
    out = tmp_path / "check.json"
    refused([*check_args(world, **over), "--json", out], capsys, *needles, absent=[out])


# --------------------------------------------------------------------------- the handler itself


def test_debug_shows_the_traceback(world, tmp_path, monkeypatch):
    """--debug (anywhere) and OPD_DEBUG=1 re-raise instead of printing one line."""
    from opd.data.schema import DataError

    argv = ["data", "prepare", "--input", str(world["prep_list"]), "--output", str(tmp_path / "o.parquet")]
    with pytest.raises(DataError, match="expected a string, got list"):
        opd_main([*argv, "--debug"])
    with pytest.raises(DataError):
        opd_main(["--debug", *argv])
    monkeypatch.setenv("OPD_DEBUG", "1")
    with pytest.raises(DataError):
        opd_main(argv)


def test_bugs_keep_their_traceback_and_library_errors_say_where(capsys):
    from opd.errors import UsageError, run_command

    def bug(argv):
        return [][1]

    with pytest.raises(IndexError):
        run_command("opd x", bug, [])

    def bad_json(argv):
        json.loads("{")

    assert run_command("opd x", bad_json, []) == 1
    assert capsys.readouterr().err.startswith("opd x: Expecting property name")

    library = types.ModuleType("somelib")  # a ValueError raised inside a library, not by OPD
    exec("def fail(argv):\n    raise ValueError('shape mismatch')\n", library.__dict__)
    assert run_command("opd x", library.fail, []) == 1
    assert capsys.readouterr().err.strip() == (
        "opd x: shape mismatch (ValueError raised by somelib; --debug shows where)"
    )

    def usage(argv):
        raise UsageError("--n must be >= 1")

    assert run_command("opd x", usage, []) == 2
    assert capsys.readouterr().err.strip() == "opd x: --n must be >= 1"

    def interrupted(argv):
        raise KeyboardInterrupt

    assert run_command("opd x", interrupted, []) == 130
    assert capsys.readouterr().err.strip() == "opd x: interrupted"


def test_storage_errors_name_the_path(tmp_path, capsys):
    """ENOSPC / EROFS / EACCES say so in one line, naming the path (the full-disk fault itself: the engine's tests)."""
    import errno

    from opd.errors import run_command

    target = tmp_path / "out"
    for code, line in (
        (errno.ENOSPC, f"no space left on device writing {target}"),
        (errno.EROFS, f"read-only file system: cannot write {target}"),
        (errno.EACCES, f"permission denied: {target}"),
    ):

        def fail(argv, code=code):
            raise OSError(code, os.strerror(code), str(target))

        assert run_command("opd x", fail, []) == 1
        assert capsys.readouterr().err.strip() == f"opd x: {line}"


# --------------------------------------------------------------------------- read-only output, the other writers


def test_train_refuses_a_read_only_output_folder(world, read_only_dir, tmp_path, capsys):
    """Review 46: the run folder cannot be made; one line naming it."""
    refused(train_args(world, tmp_path, output_dir=read_only_dir / "runs"), capsys, "read-only file system")


def test_dedup_and_export_refuse_a_read_only_output(world, read_only_dir, capsys):
    """Review 46: dedup before it reads anything heavy, export before it copies."""
    out = read_only_dir / "d.parquet"
    argv = ["data", "dedup", "--exact-only", "--source", world["train"], "--against", world["test"], "--output", out]
    refused([*argv, "--no-progress"], capsys, "read-only file system", f"{out} (--output)")
    argv = ["data", "export-llamafactory", "--rollouts", world["sft_good"], "--dataset-dir", read_only_dir / "ds"]
    refused(argv, capsys, "read-only file system")


def test_eval_grade_refuses_a_read_only_results_file(world, read_only_dir, tmp_path, capsys):
    """Review 46: graded, then the results file cannot be written: one line, no traceback."""
    code, _, err = run(gen_args(world["student"], world["test"], tmp_path / "ev"), capsys)
    assert code == 0, err
    out = read_only_dir / "results.json"
    argv = ["eval", "grade", tmp_path / "ev", "--output", out, "--workers", "1", "--no-progress"]
    refused(argv, capsys, "read-only file system", absent=[out])


def test_tokenizer_of_a_checkpoint_folder(world, tmp_path):
    """Review 16: `--tokenizer <checkpoint>` reads its model/; a tokenizer-only folder needs no config.json."""
    from opd.models import load_tokenizer, tokenizer_source

    assert tokenizer_source(str(world["checkpoint"])) == str(world["checkpoint"] / "model")
    assert load_tokenizer(str(world["checkpoint"])).get_vocab() == load_tokenizer(str(world["student"])).get_vocab()
    assert tokenizer_source(str(world["tokenizer"])) == str(world["tokenizer"])
    with pytest.raises(ValueError, match="no tokenizer files"):
        tokenizer_source(str(world["root"] / "bad" / "not_a_model"))
    with pytest.raises(FileNotFoundError, match="--tokenizer /nonexistent: no such folder"):
        tokenizer_source("/nonexistent")
