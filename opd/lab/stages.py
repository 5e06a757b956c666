"""The lab's jobs: train a model by SFT, cold-start one on a teacher's samples, run OPD, pre-flight a pair.

Each job is a plain function of (lab folder, spec dict) -> result dict, so it can run in a worker process and be
cached: its output folder is named by a hash of the spec (which names the folders of the models it starts from, so a
changed teacher invalidates everything built on it), and a finished job leaves `result.json` there. A job that finds
its `result.json` returns it without running again: a second `opd lab` reuses every teacher and student it can.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
import shutil
import time
from pathlib import Path

from opd.toy.lab_world import TEMPLATES, LabProblem, sample_problems, solution

LAB_VERSION = 1  # bump when a job's code changes what it produces, so old caches are not reused
VOCAB_SIZE = 320
MAX_NEW_TOKENS = 64  # the longest lab answer (partial sums, every word a synonym) is under 50 tokens
SPLITS = ("test", "prompts", "teacher", "student", "dev")


def spec_hash(spec: dict) -> str:
    text = json.dumps({"lab_version": LAB_VERSION, **spec}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def job_dir(lab_dir: Path, kind: str, spec: dict) -> Path:
    return Path(lab_dir) / kind / f"{spec['name']}-{spec_hash(spec)}"


def splits(world_seed: int, sizes: dict[str, int]) -> dict[str, list[tuple[int, int]]]:
    """Disjoint operand pairs per split, drawn in SPLITS order (test first, so it never depends on the others)."""
    taken: set[tuple[int, int]] = set()
    out = {}
    for i, name in enumerate(SPLITS):
        probs = sample_problems(sizes[name], seed=world_seed * 1000 + i, exclude=taken)
        out[name] = [(p.a, p.b) for p in probs]
        taken.update(out[name])
    return out


def _finish(out: Path, tmp: Path, result: dict) -> dict:
    """Publish a finished job: its result last, then the folder renamed into place (a crash leaves only `.tmp`)."""
    (tmp / "result.json").write_text(json.dumps(result, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return result


def _cached(out: Path) -> dict | None:
    return json.loads((out / "result.json").read_text()) if (out / "result.json").is_file() else None


def _fresh_tmp(out: Path) -> Path:
    """The job's work folder beside `out`, emptied of anything an interrupted run left."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def build_world(lab_dir: Path, world_seed: int, sizes: dict[str, int]) -> dict:
    """The tokenizer and the OPD / test parquet files (both templates, one data source each); returns their paths."""
    from opd.toy import build_toy_tokenizer, rl_rows
    from opd.toy.lab_world import corpus
    from opd.toy.task import write_parquet

    out = job_dir(lab_dir, "world", {"name": "world", "world_seed": world_seed, "sizes": sizes})
    if (done := _cached(out)) is not None:
        return done
    tmp = _fresh_tmp(out)
    build_toy_tokenizer(tmp / "tokenizer", vocab_size=VOCAB_SIZE, texts=corpus())
    split = splits(world_seed, sizes)
    result = {"tokenizer": str(out / "tokenizer")}
    for template in TEMPLATES:
        for name in ("prompts", "test"):
            problems = [LabProblem(a, b, template) for a, b in split[name]]
            write_parquet(rl_rows(problems, name, data_source=f"lab_{template}"), tmp / f"{name}_{template}.parquet")
            result[f"{name}_{template}"] = str(out / f"{name}_{template}.parquet")
    return _finish(out, tmp, result)


def accuracies(model, tok, test: list[tuple[int, int]]) -> dict[str, float]:
    """Greedy rule-graded accuracy on the held-out problems, per template."""
    from opd.toy.evaluate import accuracy

    return {
        t: accuracy(model, tok, [LabProblem(a, b, t) for a, b in test], max_new_tokens=MAX_NEW_TOKENS)["accuracy"]
        for t in TEMPLATES
    }


def teacher_samples(teacher, tok, problems: list[LabProblem], seed: int, accept: str) -> list[list[dict]]:
    """The teacher's temperature-1 answers as SFT conversations: those the rule grader accepts (`accept="correct"`,
    rejection sampling) or every one (`"any"`, for the machinery tests' untrained teachers)."""
    from opd.grading import score_response
    from opd.toy.evaluate import sample_responses

    responses = sample_responses(
        teacher, tok, problems, temperature=1.0, seed=seed, max_new_tokens=MAX_NEW_TOKENS, batch_size=512
    )
    texts = tok.batch_decode(responses, skip_special_tokens=True)
    return [p.messages(t) for p, t in zip(problems, texts) if accept == "any" or score_response(t, p.answer)]


def own_entropy(model, tok, problems: list[LabProblem], seed: int) -> float:
    """Nats per response token (EOS included) of the model's next-token distribution along its own temperature-1
    samples: how much real choice the model keeps (the lab world needs >= 0.3 for top-k to carry meaning)."""
    import torch

    from opd.toy.evaluate import sample_responses

    ent: dict[tuple[int, int], float] = {}

    def observe(first: int, step: int, logits_BV, token_B) -> None:
        lp = torch.log_softmax(logits_BV.double(), -1)
        for i, e in enumerate((-(lp.exp() * lp).sum(-1)).tolist()):
            ent[(first + i, step)] = e

    responses = sample_responses(
        model, tok, problems, temperature=1.0, seed=seed, max_new_tokens=MAX_NEW_TOKENS, batch_size=512, observe=observe
    )
    values = [ent[(r, s)] for r, resp in enumerate(responses) for s in range(len(resp))]
    return sum(values) / len(values)


def _quiet() -> None:
    """One thread per worker process (tiny models gain nothing from more) and no per-save progress bars."""
    import torch
    from transformers.utils import logging

    torch.set_num_threads(1)
    logging.disable_progress_bar()


def sft_job(lab_dir: Path, spec: dict) -> dict:
    """Train one model by SFT: on gold answers of `spec['pattern']`, or (`spec['samples_from']`) on a teacher's
    accepted samples, from a fresh init or (`spec['init_from']`) from another model's weights."""
    from transformers import AutoTokenizer

    from opd.sft.trainer import SFTConfig, encode_dataset, train_sft
    from opd.toy import build_tiny_model, load_model, save_model
    from opd.toy.evaluate import accuracy

    out = job_dir(lab_dir, "models", spec)
    if (done := _cached(out)) is not None:
        return done
    t0 = time.perf_counter()
    _quiet()
    split = splits(spec["world_seed"], spec["sizes"])
    world = build_world(lab_dir, spec["world_seed"], spec["sizes"])
    tok = AutoTokenizer.from_pretrained(world["tokenizer"])
    rng = random.Random(spec["data_seed"])
    pool = split[spec["pool"]][: spec["n_problems"]]
    problems = [LabProblem(a, b, rng.choice(spec["templates"])) for a, b in pool]
    if spec.get("samples_from"):
        teacher, _ = load_model(spec["samples_from"])
        convs = teacher_samples(teacher, tok, problems, seed=spec["data_seed"], accept=spec["accept"])
        del teacher
    else:
        convs = [p.messages(solution(p, spec["pattern"], rng)) for p in problems]
    if not convs:
        raise RuntimeError(f"lab job {spec['name']}: no training conversations (the teacher's samples were all wrong)")
    if spec.get("init_from"):
        model, _ = load_model(spec["init_from"])
    else:
        model = build_tiny_model(tok, spec["size"], seed=spec["init_seed"])
    data = encode_dataset(tok, convs, max_length=160)
    stop = {}
    if spec.get("stop_at") is not None:  # the SFT curve is too steep for a fixed step count to land near a target
        dev = [LabProblem(a, b, t) for (a, b), t in zip(split["dev"], itertools.cycle(spec["templates"]))]
        stop = {
            "evaluate": lambda m, step: accuracy(m, tok, dev, max_new_tokens=MAX_NEW_TOKENS),
            "eval_every": spec["eval_every"],
            "stop_threshold": spec["stop_at"],
        }
    logs = train_sft(
        model,
        data,
        SFTConfig(
            lr=spec["lr"],
            steps=spec["steps"],
            batch_size=spec["batch_size"],
            warmup_ratio=0.05,
            seed=spec["data_seed"],
            log_every=max(1, spec["steps"]),
            progress=False,
            eval_every=stop.get("eval_every", 0),
            stop_threshold=stop.get("stop_threshold"),
        ),
        pad_token_id=tok.pad_token_id,
        evaluate=stop.get("evaluate"),
    )
    model.eval()
    tmp = _fresh_tmp(out)
    save_model(model, tok, tmp / "model")
    result = {
        "name": spec["name"],
        "dir": str(out / "model"),
        "accuracy": accuracies(model, tok, split["test"]),
        "entropy": own_entropy(model, tok, [LabProblem(a, b, spec["templates"][0]) for a, b in split["test"]], 0),
        "train_conversations": len(convs),
        "steps": logs[-1]["step"],
        "seconds": time.perf_counter() - t0,
    }
    return _finish(out, tmp, result)


SERIES = (
    "opd/overlap_ratio",
    "opd/overlap_mass_student",
    "opd/overlap_mass_teacher",
    "opd/reverse_kl",
    "opd/top1_agreement",
    "train/true_reward",
)


def opd_job(lab_dir: Path, spec: dict) -> dict:
    """OPD from spec['teacher'] into spec['student'] on prompts of spec['template'], with the local engine; returns
    the accuracy curves (greedy, both templates) and the dynamics series."""
    from opd.engines.local import train
    from opd.engines.local.config import resolve
    from opd.engines.local.logging import read_metrics
    from opd.presets import PRESETS

    out = job_dir(lab_dir, "runs", spec)
    if (done := _cached(out)) is not None:
        return done
    t0 = time.perf_counter()
    _quiet()
    world = build_world(lab_dir, spec["world_seed"], spec["sizes"])
    tmp = _fresh_tmp(out)
    cfg = resolve(
        None,
        {
            **PRESETS["toy_opd"],
            "max_resp_length": MAX_NEW_TOKENS,
            "max_val_resp_length": MAX_NEW_TOKENS,
            "total_steps": spec["steps"],
            "lr": spec["lr"],
            "mini_batch_size": spec["prompts"],
            "n_responses": spec["n"],
            "test_freq": spec["test_freq"],
            "algo.top_k": spec["top_k"],
            "actor_model_path": spec["student"],
            "reward_model_path": spec["teacher"],
            "train_dataset": world[f"prompts_{spec['template']}"],
            "test_files": [world[f"test_{t}"] for t in TEMPLATES],
            "save_freq": 0,
            "seed": spec["seed"],
            "output_dir": str(tmp),
            "run_name": "run",
            "resume": "off",
            "progress": False,
        },
    )
    rows = read_metrics(train(cfg))
    curves = {
        key: [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        for key in (*SERIES, *(f"val/lab_{t}/mean@1" for t in TEMPLATES))
    }
    result = {"name": spec["name"], "curves": curves, "seconds": time.perf_counter() - t0}
    return _finish(out, tmp, result)


def check_job(lab_dir: Path, spec: dict) -> dict:
    """`opd check` of (student, teacher) on prompts of spec['template']: the pair's initial alignment."""
    from opd.check import CheckSettings, run_check

    out = job_dir(lab_dir, "checks", spec)
    if (done := _cached(out)) is not None:
        return done
    _quiet()
    world = build_world(lab_dir, spec["world_seed"], spec["sizes"])
    report = run_check(
        CheckSettings(
            student=spec["student"],
            teacher=spec["teacher"],
            data=world[f"prompts_{spec['template']}"],
            n_prompts=spec["n_prompts"],
            k=spec["top_k"],
            max_resp_length=MAX_NEW_TOKENS,
            seed=spec["seed"],
            progress=False,
        )
    )
    tmp = _fresh_tmp(out)
    result = {
        "name": spec["name"],
        "metrics": report["metrics"],
        "student_accuracy": report["sample"]["student_accuracy"],
        "verdict": report["verdict"],
    }
    return _finish(out, tmp, result)


JOBS = {"sft": sft_job, "opd": opd_job, "check": check_job}
