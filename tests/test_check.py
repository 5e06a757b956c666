"""`opd check` on tiny toy models (CPU, seconds): numbers vs a float64 brute force, identical models, the printed
table vs the JSON, the vocabulary check, the heuristics and bad settings."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from opd.check import (
    METRICS,
    THRESHOLDS,
    CheckSettings,
    auto_edges,
    interpret,
    main,
    measure,
    pick_prompts,
    run_check,
    verdict,
)


def _untied_model(tok, seed):
    """A random tiny model with its own output layer. With tied embeddings a random model mostly predicts its
    input token again, so two random tied models agree on top-1 (0.99 measured); an untied head does not."""
    from transformers import AutoModelForCausalLM

    from opd.toy import tiny_config

    config = tiny_config(tok, size="tiny")
    config.tie_word_embeddings = False
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from opd.toy import build_tiny_model, build_toy_tokenizer, save_model, write_datasets

    root = tmp_path_factory.mktemp("check_world")
    tok = build_toy_tokenizer(root / "tok")
    paths = write_datasets(root / "data", seed=0, n_train=16, n_dev=2, n_test=2)
    student = build_tiny_model(tok, size="tiny", seed=1)
    teacher = _untied_model(tok, seed=2)
    # a teacher whose tokenizer has one more token: same ids otherwise, still not one vocabulary
    from transformers import AutoTokenizer

    other_tok = AutoTokenizer.from_pretrained(root / "tok")
    other_tok.add_tokens(["<|extra|>"])
    other = build_tiny_model(other_tok, size="tiny", seed=3)
    return {
        "tok": tok,
        "student_model": student.eval(),
        "teacher_model": teacher.eval(),
        "student": save_model(student, tok, root / "student"),
        "teacher": save_model(teacher, tok, root / "teacher"),
        "other": save_model(other, other_tok, root / "other"),
        "data": str(paths["train"]),
        "root": root,
    }


def _batch(world, lengths, seed=0):
    """Toy prompts with random (non-special) responses of the given lengths, laid out by the engine's collate."""
    from opd.engines.local.rollout import collate
    from opd.generation import render_prompt_ids
    from opd.toy import sample_problems

    tok = world["tok"]
    g = torch.Generator().manual_seed(seed)
    special = set(tok.all_special_ids)
    ordinary = torch.tensor([i for i in range(len(tok)) if i not in special])
    prompts = [render_prompt_ids(tok, p.messages()) for p in sample_problems(len(lengths), seed=seed)]
    prompts[0] = prompts[0][2:]  # one shorter prompt, so left padding is exercised
    responses = [ordinary[torch.randint(len(ordinary), (n,), generator=g)].tolist() for n in lengths]
    return prompts, responses, collate(prompts, responses, list(range(len(lengths))), tok.pad_token_id)


def _reference(student, teacher, prompts, responses, k, temperature, edges):
    """float64 brute force, one unpadded sequence at a time: per-position values, then means per window."""
    rows = []
    for p, r in zip(prompts, responses):
        ids = torch.tensor([p + r])
        with torch.no_grad():
            ls = student(input_ids=ids).logits[0, len(p) - 1 : len(p) - 1 + len(r)].double()
            lt = teacher(input_ids=ids).logits[0, len(p) - 1 : len(p) - 1 + len(r)].double()
        lp = torch.log_softmax(ls / temperature, -1)
        lq = torch.log_softmax(lt, -1)
        for t, y in enumerate(r):
            s_top = set(lp[t].topk(k).indices.tolist())
            t_top = set(lq[t].topk(k).indices.tolist())
            shared = sorted(s_top & t_top)
            ent_p = float(-(lp[t].exp() * lp[t]).sum())
            ent_q = float(-(lq[t].exp() * lq[t]).sum())
            rows.append(
                (
                    t,
                    {
                        "overlap_ratio": len(shared) / k,
                        "overlap_mass_student": float(lp[t, shared].exp().sum()),
                        "overlap_mass_teacher": float(lq[t, shared].exp().sum()),
                        "top1_agreement": float(int(lp[t].argmax()) == int(lq[t].argmax())),
                        "reverse_kl": float(lp[t, y] - lq[t, y]),
                        "entropy/student": ent_p,
                        "entropy/teacher": ent_q,
                        "entropy/gap": ent_q - ent_p,
                    },
                )
            )

    def mean(sel):
        vals = [v for t, v in rows if sel(t)]
        return {m: sum(v[m] for v in vals) / len(vals) for m, _ in METRICS}, len(vals)

    windows = []
    for lo, hi in zip(edges, [*edges[1:], math.inf]):
        m, n = mean(lambda t: lo <= t < hi)
        windows.append((m, n))
    return mean(lambda t: True)[0], windows


def _close(a, b, n_tokens, k):
    """Continuous metrics at 1e-5; a discrete one may differ by one float32 near-tie flip (padded vs unpadded)."""
    for name, _ in METRICS:
        slack = {"top1_agreement": 1.0 / n_tokens, "overlap_ratio": 1.0 / (k * n_tokens)}.get(name, 0.0)
        assert a[name] == pytest.approx(b[name], abs=1e-5 + slack), name


def test_measure_matches_float64_reference(world):
    lengths, k, temperature, edges = [5, 9, 2, 7], 8, 0.7, [0, 3, 6]
    prompts, responses, batch = _batch(world, lengths)
    s, t = world["student_model"], world["teacher_model"]
    got = measure(s, t, batch, k=k, temperature=temperature, position_edges=edges, token_budget=40)
    ref_all, ref_windows = _reference(s, t, prompts, responses, k, temperature, edges)
    n = sum(lengths)
    _close(got["metrics"], ref_all, n, k)
    assert [w["name"] for w in got["windows"]] == ["0-2", "3-5", "6+"]
    assert [w["tokens"] for w in got["windows"]] == [nw for _, nw in ref_windows] == [11, 8, 4]
    for w, (ref, nw) in zip(got["windows"], ref_windows):
        _close(w["metrics"], ref, nw, k)
    # a random student and an unrelated random teacher: little top-1 agreement
    assert got["metrics"]["top1_agreement"] < 0.5
    assert got["metrics"]["overlap_ratio"] < 0.5
    assert abs(got["metrics"]["reverse_kl"]) > 1e-4
    assert got["profile"]["tokens"] == [4.0, 4.0, 3.0, 3.0, 3.0, 2.0, 2.0, 1.0, 1.0]


def test_identical_models_agree_fully(world):
    _, _, batch = _batch(world, [6, 3, 8], seed=1)
    s = world["student_model"]
    got = measure(s, s, batch, k=16, temperature=1.0)
    m = got["metrics"]
    assert m["reverse_kl"] == pytest.approx(0.0, abs=1e-6)
    assert m["top1_agreement"] == 1.0
    assert m["overlap_ratio"] == 1.0
    assert m["overlap_mass_student"] == pytest.approx(m["overlap_mass_teacher"], abs=1e-6)
    assert m["entropy/gap"] == pytest.approx(0.0, abs=1e-5)
    assert got["position_edges"] == auto_edges(8) == [0, 2, 4, 6]
    flags = interpret(m, got["windows"], accuracy=0.0, truncated=0.0, k=16)
    assert [(f["code"], f["level"]) for f in flags] == [("indistinguishable", "warn")]
    assert verdict(flags).startswith("little to distil")


def _table(stdout: str) -> tuple[list[str], dict[str, list[float]]]:
    lines = stdout.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("metric "))
    columns = lines[head].split()[1:]
    values = {}
    for (key, label), line in zip(METRICS, lines[head + 1 : head + 1 + len(METRICS)]):
        assert line.startswith(label)
        values[key] = [float(x) for x in line[len(label) :].split()]
    return columns, values


def test_cli_json_holds_the_printed_numbers(world, tmp_path, capsys):
    out = tmp_path / "check.json"
    argv = [
        "--student",
        world["student"],
        "--teacher",
        world["teacher"],
        "--data",
        world["data"],
        "--n-prompts",
        "5",
        "--n",
        "2",
        "--k",
        "8",
        "--max-resp-length",
        "10",
        "--seed",
        "3",
        "--position-edges",
        "0,4",
        "--no-progress",
        "--json",
        str(out),
    ]
    assert main(argv) == 0
    stdout = capsys.readouterr().out
    report = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    columns, printed = _table(stdout)
    assert columns == ["all", "0-3", "4+"] == ["all"] + [w["name"] for w in report["windows"]]
    for key, _ in METRICS:
        expected = [report["metrics"][key]] + [w["metrics"][key] for w in report["windows"]]
        assert printed[key] == pytest.approx([round(v, 4) for v in expected], abs=6e-5), key
    sample = report["sample"]
    assert (sample["prompts"], sample["rollouts"]) == (5, 10)
    assert f"student rule-reward accuracy: {sample['student_accuracy']:.4f}" in stdout
    assert 0.0 <= sample["student_accuracy"] <= 1.0
    assert sample["response_tokens"] == sum(w["tokens"] for w in report["windows"])
    assert report["thresholds"] == THRESHOLDS and report["settings"]["position_edges"] == [0, 4]
    # a random student and an unrelated random teacher: the check must not call this pair compatible
    assert report["metrics"]["top1_agreement"] < THRESHOLDS["top1_agreement_low"]
    assert any(f["level"] == "warn" and "top-1" in f["message"] for f in report["flags"])
    assert report["verdict"] in stdout and "at risk" in report["verdict"]
    assert {"low_top1"} <= {f["code"] for f in report["flags"]}
    for f in report["flags"]:
        assert f"[{f['level']}] {f['message']}" in stdout
    # the same seed gives the same sample and numbers
    assert main(argv[:-2]) == 0
    assert _table(capsys.readouterr().out)[1] == printed


def test_same_folder_as_teacher_and_student(world):
    report = run_check(
        CheckSettings(world["student"], world["student"], world["data"], n_prompts=3, max_resp_length=8, progress=False)
    )
    m = report["metrics"]
    assert m["reverse_kl"] == pytest.approx(0.0, abs=1e-6)
    assert (m["top1_agreement"], m["overlap_ratio"]) == (1.0, 1.0)


def test_vocabulary_mismatch_is_a_clear_error(world, tmp_path, capsys):
    out = tmp_path / "never.json"
    code = main(
        [
            "--student",
            world["student"],
            "--teacher",
            world["other"],
            "--data",
            world["data"],
            "--no-progress",
            "--json",
            str(out),
        ]
    )
    err = capsys.readouterr().err
    assert code == 1
    assert "do not share a vocabulary" in err and world["other"] in err and "<|extra|>" in err
    assert not out.exists()


def test_bad_settings_name_the_flag(world, capsys):
    with pytest.raises(ValueError, match="--n-prompts=0"):
        CheckSettings("s", "t", "d", n_prompts=0)
    with pytest.raises(ValueError, match="--temperature"):
        CheckSettings("s", "t", "d", temperature=0.0)
    base = ["--student", world["student"], "--teacher", world["teacher"], "--data", world["data"], "--no-progress"]
    assert main(base + ["--position-edges", "0,5,3"]) == 2
    assert "--position-edges" in capsys.readouterr().err
    assert main(base + ["--position-edges", "0,a"]) == 2
    assert "comma-separated" in capsys.readouterr().err
    assert main(base + ["--k", "100000"]) == 1
    assert "--k=100000 exceeds the vocabulary" in capsys.readouterr().err
    assert main(["--student", str(world["root"] / "nope"), "--teacher", world["teacher"], "--data", world["data"]]) == 1
    assert "--student" in capsys.readouterr().err


def _metrics(**over):
    base = {
        "overlap_ratio": 0.9,
        "overlap_mass_student": 0.95,
        "overlap_mass_teacher": 0.95,
        "top1_agreement": 0.9,
        "reverse_kl": 0.3,
        "entropy/student": 0.5,
        "entropy/teacher": 0.4,
        "entropy/gap": -0.1,
    }
    return {**base, **over}


def _window(name, **over):
    return {"name": name, "first": 0, "last": None, "tokens": 10, "metrics": _metrics(**over)}


def test_interpretation_heuristics():
    th = THRESHOLDS
    clean = interpret(_metrics(), [_window("0-9"), _window("10+")], accuracy=0.5, truncated=0.0, k=16)
    assert clean == [] and verdict(clean) == "no red flag on these heuristics"

    low = interpret(_metrics(top1_agreement=th["top1_agreement_low"] - 0.01), [], accuracy=0.5, truncated=0, k=16)
    assert [f["level"] for f in low] == ["warn"] and "disagree on most" in low[0]["message"]
    assert "at risk" in verdict(low)
    mid = interpret(_metrics(top1_agreement=th["top1_agreement_caution"] - 0.01), [], accuracy=0.5, truncated=0, k=16)
    assert [f["level"] for f in mid] == ["caution"] and "cautions" in verdict(mid)

    kl = interpret(_metrics(reverse_kl=th["reverse_kl_high"] + 0.1), [], accuracy=0.5, truncated=0, k=16)
    assert [f["level"] for f in kl] == ["warn"] and "low probability to the student's choices" in kl[0]["message"]
    mass = interpret(_metrics(overlap_mass_student=0.4, overlap_ratio=0.3), [], accuracy=0.5, truncated=0, k=16)
    assert [f["level"] for f in mass] == ["warn"] and "top-16" in mass[0]["message"]
    flat = interpret(_metrics(overlap_mass_student=0.1), [], accuracy=0.5, truncated=0, k=16)
    assert flat == []  # a flat student: little mass in any top-k, yet both top-k sets agree

    peaked = interpret(_metrics(**{"entropy/teacher": 0.001}), [], accuracy=0.5, truncated=0, k=16)
    assert [f["level"] for f in peaked] == ["note"] and "overlap ratio" in peaked[0]["message"]

    decay = [_window("0-9"), _window("10-19"), _window("20+", top1_agreement=0.9 - th["decay_top1_drop"] - 0.01)]
    flags = interpret(_metrics(), decay, accuracy=0.5, truncated=0.0, k=16)
    assert [f["level"] for f in flags] == ["caution"] and "0-9" in flags[0]["message"] and "20+" in flags[0]["message"]
    slight = [_window("0-9"), _window("20+", top1_agreement=0.9 - th["decay_top1_drop"] + 0.01)]
    assert interpret(_metrics(), slight, accuracy=0.5, truncated=0.0, k=16) == []
    late = [_window("0-9"), _window("20+", reverse_kl=th["reverse_kl_high"] + 0.5)]
    flags = interpret(_metrics(), late, accuracy=0.5, truncated=0.0, k=16)
    assert [(f["code"], f["level"]) for f in flags] == [("decay", "caution")] and "late" in flags[0]["message"]
    everywhere = [_window("0-9", reverse_kl=2.0), _window("20+", reverse_kl=2.0)]
    assert interpret(_metrics(), everywhere, accuracy=0.5, truncated=0.0, k=16) == []  # not a decay

    # an incompatible pair's verdict wins over "indistinguishable"-style advice; codes are stable
    both = interpret(
        _metrics(top1_agreement=0.2, reverse_kl=3.0, overlap_mass_student=0.1, overlap_ratio=0.2),
        [],
        accuracy=0.5,
        truncated=0,
        k=16,
    )
    assert [f["code"] for f in both] == ["low_top1", "high_reverse_kl", "low_overlap_mass"]
    assert "cold start" in verdict(both)

    notes = interpret(_metrics(), [], accuracy=1.0, truncated=0.5, k=16)
    assert [(f["code"], f["level"]) for f in notes] == [("solved", "note"), ("truncated", "note")]
    assert verdict(notes) == "no red flag on these heuristics"


def test_prompt_sample_and_edges():
    a = pick_prompts(100, 10, seed=0)
    assert a == pick_prompts(100, 10, seed=0) and a == sorted(a) and len(set(a)) == 10
    assert a != pick_prompts(100, 10, seed=1)
    assert pick_prompts(5, 10, seed=0) == [0, 1, 2, 3, 4]
    assert auto_edges(100) == [0, 25, 50, 75]
    assert auto_edges(2) == [0, 1]
    assert auto_edges(1) == [0]
    assert re.fullmatch(r"[a-z0-9_]+", "_".join(THRESHOLDS))
