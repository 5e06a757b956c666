"""compare_trl: one on-policy-distillation step of TRL's DistillationTrainer and of our local engine, side by side.

    OMP_NUM_THREADS=1 .venv/bin/python bench/compare_trl.py --repeats 3            # both vocabularies (minutes)
    OMP_NUM_THREADS=1 .venv/bin/python bench/compare_trl.py --vocab toy --repeats 3
    OMP_NUM_THREADS=1 .venv/bin/python bench/compare_trl.py --check-loss           # loss / gradient agreement only
    python bench/compare_trl.py --device cuda --dtype bf16 --shapes qwen3-1.7b:qwen3-0.6b --vocab 151936 \\
        --prompts 64 --new-tokens 256 --repeats 3                                # a real shape on a GPU

Needs the `bench` extra (`pip install -c constraints.txt -e ".[bench]"`: trl==1.16.0). Nothing is downloaded
(HF_HUB_OFFLINE=1): the script builds, in a temporary folder, the toy BPE tokenizer (`opd.toy`), the toy prompts
(--prompts, default 8), and a teacher and student with random weights of the --shapes (bench/sizes.py; default
toy: a Llama-style student of 2 layers, d = 64, and teacher of 3 layers, d = 64; --layers shortens a real shape so
that it smoke-tests on a CPU), once per --vocab entry: the toy vocabulary, or padded to that many rows (151,936 is
Qwen's; embedding and tied lm_head get the extra rows, random like the others; the tokenizer never produces those
ids but the models sample them). Both tools read the same folders.

The defaults (toy shapes, fp32, CPU, 8 prompts x 32 tokens) are the settings of the tables in docs/benchmarks;
--device cuda / --dtype bf16 / --shapes / --prompts / --new-tokens change both tools alike (ours: `device`,
`model_dtype`; TRL: `use_cpu`, `bf16`, models loaded in that dtype).

The same step in both:
- the same prompts (chat template of the toy tokenizer; the check mode asserts that both tokenise them to the
  same ids), all of them in every step, one sample per prompt, temperature 1, top_p 1, no top-k cut, one CPU
  thread (torch.set_num_threads(1); set OMP_NUM_THREADS=1 too), AdamW lr 1e-6, weight decay 0.01, constant lr,
  gradient clipping at 1.0, no gradient checkpointing;
- exactly --new-tokens response tokens in both: TRL gets `generation_kwargs={"min_new_tokens": N}` (transformers
  masks EOS until N tokens are out), our engine gets an empty `Session.eos_ids` (the sampler never stops early; an
  EOS it samples, probability ~1/V under these untrained models, is an ordinary token). Each measurement checks
  that every response is N tokens long;
- the loss: TRL `beta=1` (reverse KL over the full vocabulary, token mean, from hidden states in chunks); ours
  `LOG_PROB_TOP_K=-1` (`algo.top_k=-1`: full-vocabulary reverse KL, token mean; the default estimator adds no outcome
  term), and `algo.top_k=16` as a second row (a cheaper, different loss: top-16 support of the student); rows
  "compiled" run the same with `compile_sampler=true` (a torch.compile'd decode step, compiled in the warm-up step:
  the last table gives that first step's time).

A step is what a user pays per optimiser step: TRL from `on_step_begin` to `on_step_end` (generation, scoring and
loss forward + backward, clipping, AdamW); ours one `train_step(session, step)` call (rollout and rule grading,
the no-grad passes, the update, the step's metrics). The first `--warmup` steps of each measurement are untimed
in both; ours starts timing once the rule grader's worker processes, started in the background at setup, are up
(a one-time start-up, like the trainer construction and model loading that neither tool's timing includes).
Every measurement runs in a fresh subprocess (so its peak RSS is its own), the tools alternate (TRL,
ours K=-1, ours K=16, TRL, ...), and the table gives medians over `--repeats` measurements (each the median of its
`--steps` timed steps); the ratio column is the median of the paired ratios (repeat r of ours over repeat r of
TRL). Peak RSS is the subprocess's resident-set high-water mark from just before its first step (Linux:
VmHWM after a reset through /proc/self/clear_refs), "above start" subtracts the resident set at that moment
(interpreter, libraries, models). Child processes (our math-verify grading workers) are not included. On CUDA
the same columns hold `torch.cuda.max_memory_allocated()` from the same point ("peak GPU MiB": the host's
resident set would mostly measure libraries), and each step's clock stops after a device synchronize.

Tokens/s: "generated" counts the sampled response tokens (prompts x new tokens), "scored" the prompt + response
tokens that the step's forward passes read (the same in both tools).

Loss check (`--check-loss`, and once per vocabulary at the start of a normal run): our `train_step` runs on its own
rollouts (captured by wrapping `trainer.sample_rollouts`), then TRL's `compute_loss` + backward and a plain float64
PyTorch reference run on exactly those tokens with fresh copies of the same student and teacher; it prints the
three losses and gradient norms (ours: `actor/grad_norm`, before clipping) and TRL's largest gradient deviation
from the reference. It runs on --device; with --dtype bf16 it is skipped (with a note): a float64 reference of
the fp32 weights would mostly measure bf16 rounding, not whether the two losses agree, so check with fp32.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rss import reset_peak, status_mb  # bench/rss.py, beside this script
from sizes import QWEN_VOCAB, parse_pair, random_model  # bench/sizes.py, beside this script

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

N_PROMPTS = 8  # defaults of --prompts / --new-tokens
NEW_TOKENS = 32
LR = 1e-6
WEIGHT_DECAY = 0.01
GRAD_CLIP = 1.0
SEEDS = {"student": 2, "teacher": 1}  # role -> weight seed (the toy shape's size is the role)
PHASE_KEYS = (
    "perf/time_rollout_s",
    "perf/time_score_s",
    "perf/time_update_s",
    "perf/time_student_pass_s",
    "perf/time_teacher_pass_s",
    "perf/time_step_s",
)
RESULT_TAG = "COMPARE_TRL_RESULT "


# --- memory ---------------------------------------------------------------------------------------------------


def _peak_mb(device: str = "cpu") -> float:
    """Peak since `_start_mark`: the GPU's allocated memory on CUDA, else the resident set."""
    if device == "cuda":
        import torch

        return torch.cuda.max_memory_allocated() / 2**20
    hwm = status_mb("VmHWM")
    if hwm is not None:
        return hwm
    import resource

    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def _start_mark(device: str = "cpu") -> float:
    """Memory in use now (CUDA: allocated, else resident); the high-water mark restarts here."""
    if device == "cuda":
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20
    rss = status_mb("VmRSS") or 0.0
    reset_peak()
    return rss


def _sync(device: str) -> None:
    """Wait for queued GPU work, so a step's clock stops after its kernels (no-op on CPU)."""
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def _torch_dtype(dtype: str):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass


# --- the shared world -----------------------------------------------------------------------------------------


def build_world(
    root: Path, vocabs: list[str], shapes: str = "toy", layers: int | None = None, prompts: int = N_PROMPTS
) -> dict:
    """Tokenizer, `prompts` training prompts (every step reads all of them) and, per vocabulary, the random-weight
    teacher and student of `shapes` ('<teacher>:<student>', bench/sizes.py; `layers` overrides non-toy depths)."""
    from transformers.utils import logging as hf_logging

    from opd.toy import build_toy_tokenizer, save_model, write_datasets

    hf_logging.disable_progress_bar()
    teacher_shape, student_shape = parse_pair(shapes)
    shape_of = {"student": student_shape, "teacher": teacher_shape}
    tok = build_toy_tokenizer(root / "tok")
    data = write_datasets(root / "data", seed=0, n_train=prompts, n_dev=1, n_test=1)
    world = {"train": str(data["train"]), "toy_vocab": len(tok), "models": {}, "describe": {}}
    for name in vocabs:
        vocab = len(tok) if name == "toy" else int(name)
        folders = {}
        for role, seed in SEEDS.items():
            shape = shape_of[role]
            depth = None if shape == "toy" else layers
            model = random_model(tok, shape, role, seed=seed, vocab=vocab, layers=depth)
            c, family = model.config, "Llama-style" if shape == "toy" else f"{shape}-shaped"
            world["describe"][role] = (family, c.num_hidden_layers, c.hidden_size)
            folders[role] = save_model(model, tok, root / f"v{vocab}" / role)
            del model
        world["models"][name] = {"vocab": vocab, **folders}
    return world


def _trl_prompts(train_parquet: str) -> list[list[dict]]:
    import pandas as pd

    rows = pd.read_parquet(train_parquet)["prompt"]
    return [[{"role": str(m["role"]), "content": str(m["content"])} for m in row] for row in rows]


# --- our engine -----------------------------------------------------------------------------------------------


def _our_session(spec: dict, n_steps: int, run_dir: Path):
    from opd.engines.local import trainer
    from opd.engines.local.config import resolve

    cfg = resolve(
        None,
        {
            "actor_model_path": spec["student"],
            "reward_model_path": spec["teacher"],
            "train_dataset": spec["train"],
            "test_files": [],
            "mini_batch_size": spec["prompts"],
            "n_responses": 1,
            "max_resp_length": spec["new_tokens"],
            "rollout_batch_size": spec["prompts"],
            "top_p": 1.0,
            "repetition_penalty": 1.0,
            "device": spec["device"],
            "model_dtype": spec["dtype"],
            "gradient_checkpointing": False,
            "lr": LR,
            "lr_scheduler": "constant",
            "weight_decay": WEIGHT_DECAY,
            "grad_clip": GRAD_CLIP,
            "total_epochs": n_steps,  # as many prompts as one step takes: every step reads the same prompts
            "total_steps": n_steps,
            "test_freq": 0,
            "save_freq": 0,
            "val_before_train": False,
            "progress": False,
            "log_samples": 0,
            "resume": "off",
            "output_dir": str(run_dir),
            "run_name": "ours",
            "algo.top_k": spec["k"],
            "algo.temperature": 1.0,
            "compile_sampler": bool(spec.get("compile", False)),
        },
    )
    s = trainer.setup(cfg)
    s.eos_ids = []  # never stop before --new-tokens (TRL side: min_new_tokens), see the module docstring
    return trainer, s


def run_ours(spec: dict) -> dict:
    _one_thread()
    from opd.grading import wait_for_workers

    n_steps = spec["warmup"] + spec["steps"]
    with tempfile.TemporaryDirectory() as tmp:
        trainer, s = _our_session(spec, n_steps, Path(tmp))
        # the rule grader's math-verify workers start in the background at setup (a one-time ~1-2 s of CPU, beside
        # the model loading of a real run); timing steps while they start would bill it to this short run's steps
        wait_for_workers()
        device, new_tokens = spec["device"], spec["new_tokens"]
        start_mb = _start_mark(device)
        times, phases, losses = [], {k: [] for k in PHASE_KEYS}, []
        scored = first_step = None
        for step in range(1, n_steps + 1):
            _sync(device)
            t0 = time.perf_counter()
            metrics = trainer.train_step(s, step)
            _sync(device)
            dt = time.perf_counter() - t0
            first_step = dt if first_step is None else first_step
            if metrics["train/response_length"] != new_tokens:
                raise RuntimeError(f"ours: mean response length {metrics['train/response_length']} != {new_tokens}")
            scored = round(metrics["perf/tokens_per_s"] * metrics["perf/time_step_s"])
            losses.append(metrics["actor/loss"])
            if step > spec["warmup"]:
                times.append(dt)
                for k in PHASE_KEYS:
                    phases[k].append(metrics[k])
        peak_mb = _peak_mb(device)
    return {
        "times": times,
        "first_step_s": first_step,
        "phases": phases,
        "losses": losses,
        "gen_tokens": spec["prompts"] * new_tokens,
        "scored_tokens": scored,
        "start_mb": start_mb,
        "peak_mb": peak_mb,
    }


# --- TRL ------------------------------------------------------------------------------------------------------


def _trl_trainer(spec: dict, n_steps: int, out_dir: Path, callbacks=()):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DistillationConfig, DistillationTrainer

    class TimedDistillationTrainer(DistillationTrainer):
        """Records the wall time of each generation call (the rest of the step is scoring + update)."""

        gen_times: list

        def _generate(self, prompts):
            t0 = time.perf_counter()
            out = super()._generate(prompts)
            self.gen_times.append(time.perf_counter() - t0)
            return out

    tokenizer = AutoTokenizer.from_pretrained(spec["student"], padding_side="left", truncation_side="left")
    dtype = _torch_dtype(spec["dtype"])
    student = AutoModelForCausalLM.from_pretrained(spec["student"], dtype=dtype, local_files_only=True)
    teacher = AutoModelForCausalLM.from_pretrained(spec["teacher"], dtype=dtype, local_files_only=True)
    dataset = Dataset.from_dict({"prompt": _trl_prompts(spec["train"])})
    args = DistillationConfig(
        output_dir=str(out_dir),
        max_steps=n_steps,
        per_device_train_batch_size=spec["prompts"],
        gradient_accumulation_steps=1,
        learning_rate=LR,
        lr_scheduler_type="constant",
        weight_decay=WEIGHT_DECAY,
        max_grad_norm=GRAD_CLIP,
        bf16=spec["dtype"] == "bf16",
        fp16=False,
        gradient_checkpointing=False,
        use_cpu=spec["device"] == "cpu",
        beta=1.0,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        max_completion_length=spec["new_tokens"],
        generation_kwargs={"min_new_tokens": spec["new_tokens"]},
        report_to="none",
        save_strategy="no",
        logging_steps=n_steps + 1,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    trl_trainer = TimedDistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=list(callbacks),
    )
    trl_trainer.gen_times = []
    return trl_trainer


def run_trl(spec: dict) -> dict:
    _one_thread()
    from transformers import TrainerCallback

    device, new_tokens = spec["device"], spec["new_tokens"]

    class StepClock(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []
            self.t0 = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            _sync(device)
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            _sync(device)
            self.times.append(time.perf_counter() - self.t0)

    n_steps = spec["warmup"] + spec["steps"]
    clock = StepClock()
    with tempfile.TemporaryDirectory() as tmp:
        trl_trainer = _trl_trainer(spec, n_steps, Path(tmp), callbacks=[clock])
        start_mb = _start_mark(device)
        trl_trainer.train()
        peak_mb = _peak_mb(device)
        m = trl_trainer._metrics["train"]
        lengths = m.get("completions/min_length", []) + m.get("completions/max_length", [])
        if len(clock.times) != n_steps or any(v != new_tokens for v in lengths):
            raise RuntimeError(f"TRL: {len(clock.times)} steps, completion lengths {sorted(set(lengths))}")
        prompt_ids, _, _ = trl_trainer._tokenize_prompts(_trl_prompts(spec["train"]))
    w = spec["warmup"]
    return {
        "times": clock.times[w:],
        "first_step_s": clock.times[0],
        "phases": {"generate": trl_trainer.gen_times[w:]},
        "gen_tokens": spec["prompts"] * new_tokens,
        "scored_tokens": sum(len(p) for p in prompt_ids) + spec["prompts"] * new_tokens,
        "start_mb": start_mb,
        "peak_mb": peak_mb,
    }


# --- loss check -----------------------------------------------------------------------------------------------


def _grad_norm(model) -> float:
    import torch

    sq = sum(float(p.grad.double().pow(2).sum()) for p in model.parameters() if p.grad is not None)
    return float(torch.tensor(sq).sqrt())


def run_check(spec: dict) -> dict:
    """Ours, TRL and a float64 reference: loss and gradient on the same tokens, from the same initial weights
    (fp32 models only: the driver skips it for bf16; on spec["device"])."""
    if spec["dtype"] != "fp32":
        raise ValueError("the loss check compares fp32 models with a float64 reference; run it with --dtype fp32")
    _one_thread()
    import torch
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        trainer, s = _our_session({**spec, "k": -1}, 1, Path(tmp) / "ours")
        captured = {}
        sample_rollouts = trainer.sample_rollouts

        def capture(session, problems, **kwargs):
            out = sample_rollouts(session, problems, **kwargs)
            captured["batch"] = out.batch
            return out

        trainer.sample_rollouts = capture
        try:
            metrics = trainer.train_step(s, 1)
        finally:
            trainer.sample_rollouts = sample_rollouts
        if "batch" not in captured:
            raise RuntimeError("train_step no longer calls trainer.sample_rollouts: cannot capture its rollouts")
        ours_prompt_ids = [list(s.train_set.problems[i].prompt_ids) for i in range(len(s.train_set.problems))]
        del s
        b = captured["batch"].to(spec["device"])  # TRL's loss and the reference run on the models' device
        P, T = b.prompt_width, b.resp_width
        mask = b.response_mask_NT

        # TRL's own loss function on exactly these tokens
        trl_trainer = _trl_trainer(spec, 1, Path(tmp) / "trl")
        trl_prompt_ids, _, _ = trl_trainer._tokenize_prompts(_trl_prompts(spec["train"]))
        trl_trainer.model.train()
        inputs = {
            "prompt_ids": b.input_ids_NL[:, :P],
            "prompt_mask": b.attention_mask_NL[:, :P],
            "completion_ids": b.response_ids_NT,
            "completion_mask": mask.long(),
            "num_items_in_batch": mask.sum(),
        }
        trl_loss = trl_trainer.compute_loss(trl_trainer.model, inputs)
        trl_loss.backward()
        trl_grads = {n: p.grad.detach().double().clone() for n, p in trl_trainer.model.named_parameters()}
        trl_gnorm = _grad_norm(trl_trainer.model)
        del trl_trainer

        # plain float64 reference: token mean of KL(p_student || q_teacher) over the full vocabulary
        def load(role):
            m = AutoModelForCausalLM.from_pretrained(spec[role], dtype=torch.float32, local_files_only=True)
            return m.to(spec["device"], torch.float64)

        student, teacher = load("student"), load("teacher")
        student.train()
        pos = (b.attention_mask_NL.cumsum(-1) - 1).clamp_min(0)
        kw = {"attention_mask": b.attention_mask_NL, "position_ids": pos, "logits_to_keep": T + 1}
        with torch.no_grad():
            lq = teacher(b.input_ids_NL, **kw).logits[:, :-1].log_softmax(-1)
        lp = student(b.input_ids_NL, **kw).logits[:, :-1].log_softmax(-1)
        kl_NT = (lp.exp() * (lp - lq)).sum(-1)
        ref_loss = (kl_NT * mask).sum() / mask.sum()
        ref_loss.backward()
        ref_gnorm = _grad_norm(student)
        worst = 0.0
        for n, p in student.named_parameters():
            scale = float(p.grad.abs().max()) or 1.0
            worst = max(worst, float((trl_grads[n] - p.grad).abs().max()) / scale)
    return {
        "prompts_equal": [list(p) for p in trl_prompt_ids] == ours_prompt_ids,
        "response_tokens": int(mask.sum()),
        "loss": {"ours": metrics["actor/loss"], "trl": float(trl_loss), "ref64": float(ref_loss)},
        "grad_norm": {"ours": metrics["actor/grad_norm"], "trl": trl_gnorm, "ref64": ref_gnorm},
        "trl_grad_max_rel_dev": worst,
    }


# --- driver ---------------------------------------------------------------------------------------------------


def worker_options(args: argparse.Namespace) -> dict:
    """The command-line options every worker's spec carries (the rest is per world / per tool)."""
    return {"device": args.device, "dtype": args.dtype, "prompts": args.prompts, "new_tokens": args.new_tokens}


def describe_models(describe: dict) -> str:
    """'Llama-style student (2 layers, d=64) <- teacher (3 layers, d=64)': the family once where both share it."""
    parts = []
    for role in ("student", "teacher"):
        family, layers, width = describe[role]
        same = role == "teacher" and family == describe["student"][0]
        plural = "s" if layers != 1 else ""
        parts.append(("" if same else f"{family} ") + f"{role} ({layers} layer{plural}, d={width})")
    return " <- ".join(parts)


def _worker(spec: dict) -> dict:
    return {"trl": run_trl, "ours": run_ours, "check": run_check}[spec["tool"]](spec)


def _spawn(spec: dict) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)],
        env=env,
        capture_output=True,
        text=True,
    )
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG) :])
    sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
    raise RuntimeError(f"worker {spec['tool']} failed (exit {proc.returncode})")


def _print_check(vocab: int, c: dict) -> None:
    loss, g = c["loss"], c["grad_norm"]
    print(
        f"loss check, V={vocab:,}: same prompt ids in both tools: {c['prompts_equal']}; "
        f"{c['response_tokens']} response tokens\n"
        f"  loss       ours {loss['ours']:.9f}  TRL {loss['trl']:.9f}  float64 reference {loss['ref64']:.9f}  "
        f"|ours-TRL| {abs(loss['ours'] - loss['trl']):.1e}\n"
        f"  grad norm  ours {g['ours']:.9f}  TRL {g['trl']:.9f}  float64 reference {g['ref64']:.9f}  "
        f"|ours-TRL| {abs(g['ours'] - g['trl']):.1e}; TRL's largest gradient deviation from the reference "
        f"{c['trl_grad_max_rel_dev']:.1e} (of each tensor's max)",
        flush=True,
    )


def _med(xs):
    return statistics.median(xs) if xs else float("nan")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", default=f"toy,{QWEN_VOCAB}", help=f"comma list: toy and/or sizes (toy,{QWEN_VOCAB})")
    parser.add_argument("--shapes", default="toy", help="model shapes TEACHER:STUDENT (bench/sizes.py; default toy)")
    parser.add_argument("--layers", type=int, help="depth of both non-toy models (a CPU smoke run of a real shape)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="both tools' device (default cpu)")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"), help="model dtype (default fp32)")
    parser.add_argument("--prompts", type=int, default=N_PROMPTS, help=f"prompts per step (default {N_PROMPTS})")
    parser.add_argument("--new-tokens", type=int, default=NEW_TOKENS, help=f"response tokens (default {NEW_TOKENS})")
    parser.add_argument("--repeats", type=int, default=3, help="fresh-subprocess measurements per tool (>= 3)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first, in both tools")
    parser.add_argument("--ks", default="-1,16", help="our LOG_PROB_TOP_K rows (comma list)")
    parser.add_argument(
        "--compiled-ks",
        default="-1",
        help="our LOG_PROB_TOP_K rows also run with the compiled sampler (compile_sampler=true; comma list, '' none)",
    )
    parser.add_argument("--check-loss", action="store_true", help="only the loss / gradient agreement check")
    parser.add_argument("--no-check", action="store_true", help="skip the loss check before the timings")
    parser.add_argument("--json", help="also write the raw measurements here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.worker:
        print(RESULT_TAG + json.dumps(_worker(json.loads(args.worker))), flush=True)
        return 0
    try:
        parse_pair(args.shapes)
    except ValueError as e:
        parser.error(str(e))

    import torch
    import transformers
    import trl

    vocabs = [v.strip() for v in args.vocab.split(",") if v.strip()]
    ks = [int(k) for k in args.ks.split(",")]
    compiled_ks = [int(k) for k in args.compiled_ks.split(",") if k.strip()]
    raw: dict = {"args": vars(args), "vocabs": {}}
    mem = "GPU" if args.device == "cuda" else "RSS"
    with tempfile.TemporaryDirectory() as tmp:
        world = build_world(Path(tmp), vocabs, args.shapes, args.layers, args.prompts)
        for name in vocabs:
            models = world["models"][name]
            vocab = models["vocab"]
            base = {
                "student": models["student"],
                "teacher": models["teacher"],
                "train": world["train"],
                "warmup": args.warmup,
                "steps": args.steps,
                **worker_options(args),
            }
            entry = raw["vocabs"].setdefault(str(vocab), {"runs": {}})
            if (args.check_loss or not args.no_check) and args.dtype != "fp32":
                print(f"loss check, V={vocab:,}: skipped ({args.dtype}: the float64 reference is for fp32)", flush=True)
            elif args.check_loss or not args.no_check:
                entry["check"] = _spawn({**base, "tool": "check"})
                _print_check(vocab, entry["check"])
            if args.check_loss:
                continue
            tools = [("TRL", {"tool": "trl"})] + [(f"ours K={k}", {"tool": "ours", "k": k}) for k in ks]
            tools += [(f"ours K={k} compiled", {"tool": "ours", "k": k, "compile": True}) for k in compiled_ks]
            for r in range(args.repeats):
                for label, extra in tools:
                    res = _spawn({**base, **extra})
                    entry["runs"].setdefault(label, []).append(res)
                    print(
                        f"V={vocab:,} repeat {r + 1}/{args.repeats} {label}: {_med(res['times']):.3f} s/step, "
                        f"peak {mem} {res['peak_mb']:,.0f} MiB",
                        file=sys.stderr,
                        flush=True,
                    )
    if args.json:
        Path(args.json).write_text(json.dumps(raw, indent=1))
    if args.check_loss:
        return 0

    where = "CPU, 1 thread" if args.device == "cpu" else f"CUDA ({torch.cuda.get_device_name()}), 1 CPU thread"
    print(
        f"\nOne OPD step, {args.prompts} prompts x 1 sample x {args.new_tokens} new tokens, "
        f"{describe_models(world['describe'])}, random init, {args.dtype}, {where}; TRL {trl.__version__}, "
        f"transformers {transformers.__version__}, torch {torch.__version__}; median of {args.repeats} fresh-process "
        f"measurements x {args.steps} timed steps after {args.warmup} warm-up\n"
    )
    print(
        f"| vocab | tool | loss | s / step | generated tok/s | scored tok/s | peak {mem} MiB | above start MiB "
        f"| s / step ours/TRL | peak {mem} ours/TRL |"
    )
    print("|---:|---|---|---:|---:|---:|---:|---:|---:|---:|")
    loss_names = {"TRL": "reverse KL, full vocab (beta=1)"}
    for k in ks + compiled_ks:
        loss_names[f"ours K={k}"] = "reverse KL, full vocab" if k == -1 else f"top-{k} support (different loss)"
        loss_names[f"ours K={k} compiled"] = loss_names[f"ours K={k}"] + ", compiled sampler"
    for vocab, entry in raw["vocabs"].items():
        trl_runs = entry["runs"]["TRL"]
        for label, runs in entry["runs"].items():
            sec = _med([_med(r["times"]) for r in runs])
            peak = _med([r["peak_mb"] for r in runs])
            above = _med([r["peak_mb"] - r["start_mb"] for r in runs])
            gen = runs[0]["gen_tokens"] / sec
            scored = runs[0]["scored_tokens"] / sec
            if label == "TRL":
                ratio_t = ratio_m = "1"
            else:
                ratio_t = f"{_med([_med(o['times']) / _med(t['times']) for o, t in zip(runs, trl_runs)]):.2f}x"
                ratio_m = f"{_med([o['peak_mb'] / t['peak_mb'] for o, t in zip(runs, trl_runs)]):.2f}x"
            print(
                f"| {int(vocab):,} | {label} | {loss_names[label]} | {sec:.3f} | {gen:,.0f} | {scored:,.0f} "
                f"| {peak:,.0f} | {above:,.0f} | {ratio_t} | {ratio_m} |"
            )

    print("\nWhere the step's time goes (median s over all timed steps; ours: train_step's perf/ metrics)\n")
    cols = ["rollout", "score", "update", "- student pass", "- teacher pass", "step (perf)", "TRL: generate"]
    print("| vocab | tool | " + " | ".join(cols) + " |")
    print("|---:|---|" + "---:|" * len(cols))
    for vocab, entry in raw["vocabs"].items():
        for label, runs in entry["runs"].items():
            merged: dict[str, list] = {}
            for r in runs:
                for key, vals in r["phases"].items():
                    merged.setdefault(key, []).extend(vals)
            if label == "TRL":
                cells = ["-"] * 6 + [f"{_med(merged['generate']):.3f}"]
            else:
                cells = [f"{_med(merged[k]):.3f}" for k in PHASE_KEYS] + ["-"]
            print(f"| {int(vocab):,} | {label} | " + " | ".join(cells) + " |")

    print("\nFirst (untimed warm-up) step, median s: one-time costs such as the sampler's compilation\n")
    print("| vocab | " + " | ".join(raw["vocabs"][next(iter(raw["vocabs"]))]["runs"]) + " |")
    print("|---:|" + "---:|" * len(raw["vocabs"][next(iter(raw["vocabs"]))]["runs"]))
    for vocab, entry in raw["vocabs"].items():
        cells = [f"{_med([r['first_step_s'] for r in runs]):.3f}" for runs in entry["runs"].values()]
        print(f"| {int(vocab):,} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
