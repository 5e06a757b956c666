"""Dynamics metrics vs set-based python loops, with ragged padding (garbage there), empty intersections, windows."""

from __future__ import annotations

import math

import pytest
import torch

from opd.core.metrics import DiagnosticInputs, dynamics_metrics, per_position_profile
from opd.core.support import build_support
from opd.core.types import LogitStats

N, T, V, K = 5, 9, 10, 3
EDGES = (0, 3, 5)


def make_batch(seed: int, strategy: str = "only_stu", tail: bool = False):
    gen = torch.Generator().manual_seed(seed)
    s_logits = torch.randn(N, T, V, generator=gen) * 2
    t_logits = torch.randn(N, T, V, generator=gen) * 2
    t_logits[0, 0] = -s_logits[0, 0]  # reversed preferences: disjoint top-3 sets at a valid position
    t_logits[1, 1] = s_logits[1, 1] + 0.01 * torch.randn(V, generator=gen)  # full overlap
    lengths = torch.tensor([T, 2, 6, 1, 4])
    mask = (torch.arange(T)[None, :] < lengths[:, None]).float()

    def stats(logits):
        lp = torch.log_softmax(logits, -1)
        top_lp, top_ids = lp.topk(K, dim=-1)
        ent = -(lp.exp() * lp).sum(-1)
        ent = torch.where(mask > 0, ent, torch.full_like(ent, float("nan")))  # padding garbage
        return LogitStats(topk_ids_NTK=top_ids, topk_lp_NTK=top_lp, lp_at_ids_NTJ=None, entropy_NT=ent), lp

    student, s_lp = stats(s_logits)
    teacher, t_lp = stats(t_logits)
    support = build_support(
        strategy,
        student_topk_ids_NTK=student.topk_ids_NTK,
        teacher_topk_ids_NTK=teacher.topk_ids_NTK,
        student_lp_at_student_NTK=student.topk_lp_NTK,
        teacher_lp_at_student_NTK=t_lp.gather(-1, student.topk_ids_NTK),
        student_lp_at_teacher_NTK=s_lp.gather(-1, teacher.topk_ids_NTK),
        teacher_lp_at_teacher_NTK=teacher.topk_lp_NTK,
        tail_bucket=tail,
    )
    adv = torch.randn(support.ids_NTC.shape, generator=gen) * support.valid_NTC
    rkl = torch.rand(N, T, generator=gen)
    return dict(mask=mask, student=student, teacher=teacher, support=support, adv=adv, rkl=rkl, s_lp=s_lp, t_lp=t_lp)


def reference(b, positions):
    """Set-based loop over the given (n, t) positions -> {name: mean}."""
    acc: dict[str, list[float]] = {}
    slot_acc: dict[str, list[float]] = {}
    sup = b["support"]
    for n, t in positions:
        S = set(b["student"].topk_ids_NTK[n, t].tolist())
        Tt = set(b["teacher"].topk_ids_NTK[n, t].tolist())
        both = S & Tt
        p = b["s_lp"][n, t].double().exp()
        q = b["t_lp"][n, t].double().exp()
        rec = {
            "overlap_ratio": len(both) / K,
            "overlap_mass_student": sum(p[v].item() for v in both),
            "overlap_mass_teacher": sum(q[v].item() for v in both),
            "top1_agreement": float(int(p.argmax()) == int(q.argmax())),
            "entropy/student": -(p * p.log()).sum().item(),
            "entropy/teacher": -(q * q.log()).sum().item(),
            "reverse_kl": b["rkl"][n, t].item(),
        }
        rec["entropy/gap"] = rec["entropy/teacher"] - rec["entropy/student"]
        counts = {"student": 0, "teacher": 0, "overlap": 0, "valid": 0}
        for c in range(sup.ids_NTC.shape[-1]):
            if not sup.valid_NTC[n, t, c]:
                continue
            v = int(sup.ids_NTC[n, t, c])
            a = b["adv"][n, t, c].item()
            counts["valid"] += 1
            slot_acc.setdefault("advantage_mean", []).append(a)
            if v == -1:  # tail bucket
                continue
            counts["student"] += v in S
            counts["teacher"] += v in Tt
            counts["overlap"] += v in both
            side = "overlap_token" if v in both else ("student_only" if v in S else "teacher_only")
            key = f"{side}_advantage"
            slot_acc.setdefault(key, []).append(a)
        for k, val in counts.items():
            rec[f"candidates/{k}"] = val
        for k, val in rec.items():
            acc.setdefault(k, []).append(val)
    out = {k: sum(v) / len(v) for k, v in acc.items()}
    out.update({k: sum(v) / len(v) for k, v in slot_acc.items()})
    return out


@pytest.mark.parametrize("strategy,tail", [("only_stu", False), ("union", True), ("union-intersection", False)])
def test_dynamics_metrics_match_set_based_loop(strategy, tail):
    b = make_batch(1, strategy, tail)
    got = dynamics_metrics(
        DiagnosticInputs(
            response_mask_NT=b["mask"],
            student=b["student"],
            teacher=b["teacher"],
            support=b["support"],
            advantages=b["adv"],
            reverse_kl_NT=b["rkl"],
        ),
        position_edges=EDGES,
    )
    valid_pos = [(n, t) for n in range(N) for t in range(T) if b["mask"][n, t] > 0]
    # the batch really has an empty and a full intersection at valid positions
    sets = [
        (set(b["student"].topk_ids_NTK[n, t].tolist()), set(b["teacher"].topk_ids_NTK[n, t].tolist()))
        for n, t in valid_pos
    ]
    assert any(not (s & t) for s, t in sets) and any(s == t for s, t in sets)
    want = reference(b, valid_pos)
    windows = {"pos/0-2/": range(0, 3), "pos/3-4/": range(3, 5), "pos/5+/": range(5, T)}
    for prefix, rng in windows.items():
        sub = reference(b, [(n, t) for n, t in valid_pos if t in rng])
        want.update({prefix + k: v for k, v in sub.items()})
    for k, v in want.items():
        assert got[f"opd/{k}"] == pytest.approx(v, rel=1e-6, abs=1e-7), k
    # no key the reference does not know, apart from extrema and lengths (checked below)
    extra = {k for k in got if k.removeprefix("opd/") not in want}
    allowed = ("opd/max_adv/", "opd/min_adv/", "opd/response_length/", "opd/valid_tokens")
    assert all(k.startswith(allowed) for k in extra)
    if strategy == "only_stu":
        assert "opd/teacher_only_advantage" not in got  # empty population: omitted, never NaN
    assert all(math.isfinite(v) for v in got.values())
    lens = b["mask"].sum(-1)
    assert got["opd/response_length/mean"] == pytest.approx(lens.mean().item())
    assert got["opd/response_length/max"] == T and got["opd/response_length/min"] == 1
    assert got["opd/valid_tokens"] == lens.sum().item()


def test_extrema_at_max_and_min_advantage_overlap_slot():
    b = make_batch(2, "union")
    got = dynamics_metrics(DiagnosticInputs(response_mask_NT=b["mask"], support=b["support"], advantages=b["adv"]))
    best = worst = None
    sup = b["support"]
    for n in range(N):
        for t in range(T):
            if b["mask"][n, t] == 0:
                continue
            S = set(b["student"].topk_ids_NTK[n, t].tolist())
            Tt = set(b["teacher"].topk_ids_NTK[n, t].tolist())
            for c in range(sup.ids_NTC.shape[-1]):
                v = int(sup.ids_NTC[n, t, c])
                if not sup.valid_NTC[n, t, c] or v not in S & Tt:
                    continue
                rec = (b["adv"][n, t, c].item(), b["s_lp"][n, t, v].exp().item(), b["t_lp"][n, t, v].exp().item())
                best = rec if best is None or rec[0] > best[0] else best
                worst = rec if worst is None or rec[0] < worst[0] else worst
    for tag, (a, p, q) in (("max_adv", best), ("min_adv", worst)):
        assert got[f"opd/{tag}/A"] == pytest.approx(a)
        assert got[f"opd/{tag}/p"] == pytest.approx(p, rel=1e-5)
        assert got[f"opd/{tag}/q"] == pytest.approx(q, rel=1e-5)
        assert got[f"opd/{tag}/p_minus_q"] == pytest.approx(p - q, rel=1e-5, abs=1e-7)
    assert got["opd/max_adv/A"] > got["opd/min_adv/A"]


def test_sampled_token_and_grpo_inputs():
    """K = 0: no top-k, so no overlap keys; [N, T] advantages: advantage_mean over valid positions; no teacher."""
    b = make_batch(3)
    adv_NT = torch.randn(N, T)
    adv_NT[b["mask"] == 0] = float("nan")
    no_topk = LogitStats(None, None, None, b["student"].entropy_NT)
    got = dynamics_metrics(
        DiagnosticInputs(response_mask_NT=b["mask"], student=no_topk, advantages=adv_NT), position_edges=(0,)
    )
    m = b["mask"] > 0
    # float64 reference with an absolute floor: a float32 mean of values summing near 0 loses relative precision
    assert got["opd/advantage_mean"] == pytest.approx(adv_NT[m].double().mean().item(), rel=1e-6, abs=1e-7)
    assert got["opd/pos/0+/advantage_mean"] == pytest.approx(got["opd/advantage_mean"])
    assert got["opd/entropy/student"] == pytest.approx(b["student"].entropy_NT[m].double().mean().item(), rel=1e-6)
    assert not any("overlap" in k or "teacher" in k or "gap" in k for k in got)


def test_windows_beyond_every_response_are_omitted_and_bad_edges_raise():
    b = make_batch(4)
    got = dynamics_metrics(
        DiagnosticInputs(response_mask_NT=b["mask"], student=b["student"], teacher=b["teacher"]),
        position_edges=(0, 4, 100),
    )
    assert "opd/pos/0-3/overlap_ratio" in got and "opd/pos/4-99/overlap_ratio" in got
    assert not any(k.startswith("opd/pos/100+") for k in got)
    with pytest.raises(ValueError, match="position_edges"):
        dynamics_metrics(DiagnosticInputs(response_mask_NT=b["mask"]), position_edges=(5, 3))


def test_per_position_profile_matches_loop_with_bins():
    b = make_batch(5, "union", tail=True)
    prof = per_position_profile(
        DiagnosticInputs(
            response_mask_NT=b["mask"],
            student=b["student"],
            teacher=b["teacher"],
            support=b["support"],
            advantages=b["adv"],
            reverse_kl_NT=b["rkl"],
        ),
        bin_size=2,
    )
    assert prof["position"] == [0.0, 2.0, 4.0, 6.0, 8.0]
    for i, start in enumerate(range(0, T, 2)):
        pos = [(n, t) for n in range(N) for t in range(start, min(start + 2, T)) if b["mask"][n, t] > 0]
        assert prof["tokens"][i] == len(pos)
        want = reference(b, pos)
        for k, v in want.items():
            assert prof[k][i] == pytest.approx(v, rel=1e-6, abs=1e-7), (k, i)
    b["mask"][:, 5:] = 0
    prof = per_position_profile(
        DiagnosticInputs(response_mask_NT=b["mask"], student=b["student"], teacher=b["teacher"])
    )
    assert len(prof["overlap_ratio"]) == 5  # trimmed to the last reached position
    assert prof["tokens"] == [float((b["mask"][:, t] > 0).sum()) for t in range(5)]


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
        ),
    ],
)
def test_metrics_on_device_match_cpu(device):
    b = make_batch(6, "union", tail=True)

    def moved(x):
        if isinstance(x, torch.Tensor):
            return x.to(device)
        if x is None or isinstance(x, (str, bool, int, float)):
            return x
        return type(x)(**{k: moved(v) for k, v in vars(x).items()})

    kw = dict(
        response_mask_NT=b["mask"],
        student=b["student"],
        teacher=b["teacher"],
        support=b["support"],
        advantages=b["adv"],
        reverse_kl_NT=b["rkl"],
    )
    cpu = dynamics_metrics(DiagnosticInputs(**kw), position_edges=EDGES)
    dev = dynamics_metrics(DiagnosticInputs(**{k: moved(v) for k, v in kw.items()}), position_edges=EDGES)
    assert dev.keys() == cpu.keys() and dev == pytest.approx(cpu, rel=1e-6)
    prof_cpu = per_position_profile(DiagnosticInputs(**kw), bin_size=3)
    prof_dev = per_position_profile(DiagnosticInputs(**{k: moved(v) for k, v in kw.items()}), bin_size=3)
    assert prof_dev.keys() == prof_cpu.keys()
    for k in prof_cpu:
        assert prof_dev[k] == pytest.approx(prof_cpu[k], rel=1e-6, nan_ok=True), k
