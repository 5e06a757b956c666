"""Tiny verl test assets built in-process (nothing downloads): a ChatML byte-level tokenizer, a random tiny Qwen2
and the toy task's RL parquet files.

Why a ChatML tokenizer rather than the toy world's: verl picks its prompt/response token builder from the model
type, and for qwen2 it requires ``<|im_end|>`` and a newline that is one token, which a byte-level BPE gives.
The model is left near uniform on purpose (random init, std 0.02): a top-k filter leaking into the rollout then
shows up as a large rollout/trainer probability gap.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

PAD, EOS, IM_START = "<|endoftext|>", "<|im_end|>", "<|im_start|>"
CHATML = (
    "{% for message in messages %}"
    + IM_START
    + "{{ message['role'] }}\n{{ message['content'] }}"
    + EOS
    + "\n{% endfor %}{% if add_generation_prompt %}"
    + IM_START
    + "assistant\n{% endif %}"
)


def build_chatml_tokenizer(out_dir, vocab_size: int = 320):
    """A byte-level BPE (Qwen2's pre-tokenizer) trained on the toy task's text, with ChatML specials."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    from opd.toy.task import corpus

    raw = Tokenizer(models.BPE())
    raw.normalizer = normalizers.NFC()
    raw.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[PAD, IM_START, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    raw.train_from_iterator(corpus(n=500), trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        pad_token=PAD,
        eos_token=EOS,
        unk_token=PAD,
        additional_special_tokens=[IM_START],
        chat_template=CHATML,
        model_max_length=512,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    tok.save_pretrained(out_dir)
    return tok


@pytest.fixture(scope="session")
def verl_assets(tmp_path_factory):
    """Paths: `model` (tiny Qwen2 + tokenizer folder), `other` (same shape, other seed), `train`/`val` parquet."""
    from opd.toy import build_tiny_model, save_model
    from opd.toy.task import make_splits, rl_rows, write_parquet

    root = tmp_path_factory.mktemp("verl_assets")
    tok = build_chatml_tokenizer(root / "tokenizer")
    paths = {}
    for name, seed in (("model", 0), ("other", 1)):
        paths[name] = save_model(build_tiny_model(tok, size="student", seed=seed, arch="qwen2"), tok, root / name)
    splits = make_splits(seed=0, n_train=32, n_dev=8, n_test=1)
    paths["train"] = str(write_parquet(rl_rows(splits["train"], "train"), root / "train.parquet"))
    paths["val"] = str(write_parquet(rl_rows(splits["dev"], "dev"), root / "val.parquet"))
    paths["root"] = str(root)
    return paths


# --- verl's main_ppo through the launchers (ENGINE=verl), on the CPU ----------------------------------------------

ROOT = Path(__file__).resolve().parents[2]
RUN_TIMEOUT_S = 900  # a run is ~2-3 min on an idle 2-core host; the margin is for a shared one
# The launcher sets OPD_VERL, VERL_PLATFORM, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER (Ray's single-machine mode: node
# address 127.0.0.1 everywhere, so Ray, TransferQueue and gloo listen on the loopback only) and GLOO_SOCKET_IFNAME.
QUIET_ENV = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "WANDB_MODE": "disabled",
    "RAY_DEDUP_LOGS": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
}


def session_pids(sid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and os.getsid(int(entry)) == sid:
                pids.append(int(entry))
        except (ProcessLookupError, PermissionError):
            pass
    return pids


def run_in_session(command: list[str], env: dict, cwd: str, log_path: Path, timeout: float) -> tuple[int, float]:
    """(return code, wall seconds). The command leads a new session (Ray's workers change process group, not
    session); afterwards every process still in it, and nothing else, is killed by PID."""
    start = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
            wall = time.monotonic() - start
            deadline = time.monotonic() + 15  # Ray's own shutdown normally empties the session within seconds
            while session_pids(proc.pid) and time.monotonic() < deadline:
                time.sleep(1)
        except subprocess.TimeoutExpired:
            rc, wall = -signal.SIGKILL, time.monotonic() - start
        finally:
            for pid in session_pids(proc.pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            proc.wait()
    return rc, wall


def tiny_knobs(assets: dict, out_dir: Path, run_name: str, **knobs) -> dict[str, str]:
    """Launcher variables of a seconds-per-step run: 4 prompts x 4 samples, 16 response tokens, fp32."""
    base = dict(
        ENGINE="verl",
        ACTOR_MODEL_PATH=assets["model"],
        TRAIN_DATASET=assets["train"],
        TEST_FILE=assets["val"],
        MINI_BATCH_SIZE="4",
        N_RESPONSES="4",
        MAX_PROMPT_LENGTH="48",
        MAX_RESP_LENGTH="16",
        MICRO_BATCH_TOKENS="256",
        LR="1e-3",
        TOTAL_STEPS="2",
        TEST_FREQ="0",
        SAVE_FREQ="0",
        VAL_BEFORE_TRAIN="False",
        OUTPUT_DIR=str(out_dir),
        RUN_NAME=run_name,
        MODEL_DTYPE="fp32",
        PYTHON=sys.executable,
    )
    base.update(knobs)
    return base


@pytest.fixture
def run_launcher(tmp_path):
    """run(script, knobs, *hydra_overrides) -> (metrics by step, log text, wall seconds); asserts the run passed."""

    def run(script: str, knobs: dict, *overrides: str) -> tuple[dict[int, dict], str, float]:
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "ENGINE", "PRESET")}
        env.update(QUIET_ENV, **knobs)
        ray_tmp = tempfile.mkdtemp(prefix="opdray_", dir="/tmp")  # short: Ray's socket paths must stay < 108 chars
        log_path = tmp_path / f"{knobs['RUN_NAME']}.log"
        try:
            rc, wall = run_in_session(
                ["bash", str(ROOT / script), f"+ray_kwargs.ray_init._temp_dir={ray_tmp}", *overrides],
                env,
                str(tmp_path),
                log_path,
                RUN_TIMEOUT_S,
            )
        finally:
            shutil.rmtree(ray_tmp, ignore_errors=True)
        log = log_path.read_text(errors="replace")
        assert rc == 0, f"{script} (ENGINE=verl) exited {rc} after {wall:.0f} s; log tail:\n{log[-6000:]}"
        assert "[opd] verl plugin registration failed" not in log
        metrics = Path(knobs["OUTPUT_DIR"]) / knobs["RUN_NAME"] / "metrics.jsonl"
        steps = {rec["step"]: rec["data"] for rec in map(json.loads, metrics.read_text().splitlines())}
        return steps, log, wall

    return run


@pytest.fixture
def knobs(verl_assets, tmp_path):
    """knobs(run_name, **overrides): the tiny run's launcher variables (see `tiny_knobs`)."""
    return lambda run_name, **kw: tiny_knobs(verl_assets, tmp_path / "runs", run_name, **kw)
