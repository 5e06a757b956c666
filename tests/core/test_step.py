"""The core's whole step (`opd.core.step`) on hand-built logits, no model and no engine: for every kind of support
and every estimator, the loss value and its gradient w.r.t. the student logits equal a float64 brute force of the
algorithm written from its definition (python loops over positions and candidate sets), and the diagnostics'
reverse KL equals its float64 value. Micro-batched (rows) losses add up to the full-batch loss."""

from __future__ import annotations

import math

import pytest
import torch

from opd.core.config import OPDConfig
from opd.core.step import (
    OutputHead,
    StepReads,
    build_targets,
    loss_totals,
    merge_loss_metrics,
    needs_student_logits,
    read_full_kl,
    read_student,
    read_student_at_teacher,
    read_teacher,
    step_diagnostics,
    step_loss,
    target_logprobs,
)

F64 = torch.float64
N, T, V = 6, 5, 11  # 3 prompts x 2 rollouts
GROUPS = torch.tensor([0, 0, 1, 1, 2, 2])
EPS = 1e-6


def make_batch(seed: int):
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(N, T, V, generator=gen, dtype=F64) * 2
    teacher = student + torch.randn(N, T, V, generator=gen, dtype=F64) * 1.5
    ids = torch.randint(0, V, (N, T), generator=gen)
    lengths = torch.tensor([5, 3, 4, 5, 1, 2])
    mask = (torch.arange(T)[None] < lengths[:, None]).float()
    outcome = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0])
    return student, teacher, ids, mask, outcome


def run_step(cfg: OPDConfig, student, teacher, ids, mask, outcome, *, rows=None):
    """The engine's job in a few lines: reads, targets, loss (optionally by micro-batch rows), backward."""
    s_logits = student.detach().clone().requires_grad_(True)
    with torch.no_grad():
        reads = StepReads(student=read_student(cfg, s_logits, ids))
        if cfg.needs_teacher:
            reads.teacher = read_teacher(cfg, teacher, ids, reads.student.topk_ids_NTK)
            reads.student.lp_at_other_NTK = read_student_at_teacher(cfg, s_logits, reads.teacher.topk_ids_NTK)
            reads.full_kl_NT = read_full_kl(cfg, s_logits, teacher)
    targets = build_targets(
        cfg, reads, response_ids_NT=ids, response_mask_NT=mask, group_index_N=GROUPS, outcome_scores_N=outcome
    )
    totals = loss_totals(targets, norm_length=T)
    parts, total = [], 0.0
    for start, stop in rows or [(0, N)]:
        tg = targets.rows(start, stop, T)
        loss, metrics = step_loss(cfg, tg, s_logits[start:stop], totals=totals, teacher_logits_NTV=teacher[start:stop])
        loss.backward()
        total += float(loss.detach())
        parts.append((metrics, float(tg.response_mask_NT.sum())))
    merged = merge_loss_metrics(parts, totals)
    return total, s_logits.grad, reads, targets, merged


# --- the brute force --------------------------------------------------------------------------------------------


def group_outcome(outcome):
    adv = torch.zeros(N, dtype=F64)
    for g in GROUPS.unique():
        idx = (GROUPS == g).nonzero().flatten()
        s = outcome[idx].double()
        centred = s - s.mean()
        std = s.std(unbiased=True) if len(idx) > 1 else torch.tensor(0.0, dtype=F64)
        adv[idx] = centred / (std + EPS)
    return adv


def candidates(strategy, lp, lq, K):
    S = sorted(range(V), key=lambda v: -lp[v].item())[:K]
    Tq = sorted(range(V), key=lambda v: -lq[v].item())[:K]
    return {
        "only_stu": S,
        "only_tch": Tq,
        "intersection": [v for v in S if v in Tq],
        "union": S + [v for v in Tq if v not in S],
        "union-intersection": [v for v in S if v not in Tq] + [v for v in Tq if v not in S],
    }[strategy]


def brute_force(cfg: OPDConfig, student, teacher, ids, mask, outcome):
    """(loss, grad) of the step from the definitions: every term is -A * exp(lp - sg(lp)) (value -A, gradient
    -A grad lp), token-mean over valid positions."""
    x = student.detach().clone().requires_grad_(True)
    lp_all = torch.log_softmax(x / cfg.temperature, -1)
    lq_all = torch.log_softmax(teacher / cfg.teacher_temperature, -1)
    out_adv = group_outcome(outcome)
    terms = []  # (n, t, differentiable lp of the candidate, constant A)

    def ratio_term(n, t, lp_c, adv):
        terms.append(-adv * torch.exp(lp_c - lp_c.detach()))

    valid = [(n, t) for n in range(N) for t in range(T) if mask[n, t] > 0]
    est = cfg.adv_estimator
    if cfg.support == "sampled":
        r = {(n, t): (lq_all[n, t, ids[n, t]] - lp_all[n, t, ids[n, t]]).item() for n, t in valid}
        if est == "token_grpo":
            normed = {}
            for g in GROUPS.unique().tolist():
                keys = [(n, t) for n, t in valid if GROUPS[n] == g]
                vals = torch.tensor([r[k] for k in keys], dtype=F64)
                z = (vals - vals.mean()) / (vals.std(unbiased=True) + EPS)
                normed.update(zip(keys, z.tolist()))
            adv = {(n, t): sum(normed[(n, u)] for u in range(t, T) if (n, u) in normed) for n, t in valid}
        else:
            adv = {
                (n, t): {
                    "token_reward_direct": r[(n, t)],
                    "grpo": out_adv[n].item(),
                    "token_reward_direct_plus_grpo": r[(n, t)] + cfg.grpo_outcome_weight * out_adv[n].item(),
                }[est]
                for n, t in valid
            }
        for n, t in valid:
            ratio_term(n, t, lp_all[n, t, ids[n, t]], adv[(n, t)])
    elif cfg.support == "topk":
        normalise = cfg.top_k_strategy != "union-intersection"
        for n, t in valid:
            lp, lq = lp_all[n, t], lq_all[n, t]
            cand = candidates(cfg.top_k_strategy, lp.detach(), lq, cfg.top_k)
            slots = [(lp[v], lq[v].item()) for v in cand]
            if cfg.tail_bucket:
                covered_p = sum(lp[v].exp() for v in cand) if cand else torch.tensor(0.0, dtype=F64)
                covered_q = sum(lq[v].exp().item() for v in cand)
                slots.append((torch.log1p(-covered_p), math.log1p(-covered_q)))
            base = [
                {"student_p": math.exp(a.item()), "teacher_p": math.exp(b), "none": 1.0}[cfg.reward_weight_mode]
                for a, b in slots
            ]
            z = sum(base) if normalise else 1.0
            for (a, b), w in zip(slots, base):
                ratio_term(n, t, a, w / z * (b - a.item()))
            if est == "token_reward_direct_plus_grpo":
                ratio_term(n, t, lp[ids[n, t]], cfg.grpo_outcome_weight * out_adv[n].item())
    else:  # full vocabulary: A(v) = p(v) (lq - lp) on every token, plus the outcome term on the sampled token
        for n, t in valid:
            lp, lq = lp_all[n, t], lq_all[n, t]
            for v in range(V):
                ratio_term(n, t, lp[v], (lp[v].exp() * (lq[v] - lp[v])).item())
            if est == "token_reward_direct_plus_grpo":
                ratio_term(n, t, lp[ids[n, t]], cfg.grpo_outcome_weight * out_adv[n].item())
    loss = torch.stack(terms).sum() / len(valid)
    loss.backward()
    return float(loss.detach()), x.grad


CASES = [
    dict(top_k=0, adv_estimator="token_reward_direct"),
    dict(top_k=0, adv_estimator="token_reward_direct_plus_grpo", grpo_outcome_weight=0.5),
    dict(top_k=0, adv_estimator="token_grpo"),
    dict(top_k=0, adv_estimator="grpo"),
    dict(top_k=3, adv_estimator="token_reward_direct"),
    dict(top_k=3, adv_estimator="token_reward_direct", top_k_strategy="only_tch", reward_weight_mode="teacher_p"),
    dict(top_k=3, adv_estimator="token_reward_direct", top_k_strategy="intersection"),
    dict(top_k=3, adv_estimator="token_reward_direct", top_k_strategy="union", reward_weight_mode="none"),
    dict(top_k=3, adv_estimator="token_reward_direct", top_k_strategy="union-intersection"),
    dict(top_k=3, adv_estimator="token_reward_direct", tail_bucket=True),
    dict(top_k=3, adv_estimator="token_reward_direct_plus_grpo", top_k_strategy="union", tail_bucket=True),
    dict(top_k=-1, adv_estimator="token_reward_direct"),
    dict(top_k=-1, adv_estimator="token_reward_direct_plus_grpo", grpo_outcome_weight=2.0),
]


def _case_id(case: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in case.items())


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_step_matches_float64_brute_force(case):
    cfg = OPDConfig(temperature=0.9, teacher_temperature=1.1, **case)
    student, teacher, ids, mask, outcome = make_batch(seed=len(_case_id(case)))
    loss, grad, reads, targets, metrics = run_step(cfg, student, teacher, ids, mask, outcome)
    want_loss, want_grad = brute_force(cfg, student, teacher, ids, mask, outcome)
    assert loss == pytest.approx(want_loss, rel=1e-4, abs=1e-6)
    assert metrics["actor/loss"] == pytest.approx(loss, rel=1e-6)
    torch.testing.assert_close(grad, want_grad, rtol=1e-4, atol=1e-6)  # reads and rewards are float32
    assert want_grad.abs().max() > 1e-3  # a real signal was compared
    assert (grad[mask == 0] == 0).all()  # masked positions never reach the gradient
    if cfg.needs_teacher:  # the diagnostics read the same tensors: reverse KL, exact or k1 at the sampled token
        diag = step_diagnostics(reads, mask, targets)
        lp = torch.log_softmax(student / cfg.temperature, -1)
        lq = torch.log_softmax(teacher / cfg.teacher_temperature, -1)
        if cfg.support == "full":
            kl_NT = (lp.exp() * (lp - lq)).sum(-1)
        else:
            kl_NT = (lp - lq).gather(-1, ids[..., None])[..., 0]
        want_kl = float((kl_NT * mask).sum() / mask.sum())
        assert diag["opd/reverse_kl"] == pytest.approx(want_kl, rel=1e-5, abs=1e-6)  # float32 reads


@pytest.mark.parametrize("case", [CASES[1], CASES[10], CASES[12]], ids=_case_id)
def test_micro_batched_step_adds_up_to_the_full_batch(case):
    cfg = OPDConfig(**case)
    student, teacher, ids, mask, outcome = make_batch(seed=7)
    whole = run_step(cfg, student, teacher, ids, mask, outcome)
    split = run_step(cfg, student, teacher, ids, mask, outcome, rows=[(0, 1), (1, 4), (4, 6)])
    assert split[0] == pytest.approx(whole[0], rel=1e-6, abs=1e-8)
    torch.testing.assert_close(split[1], whole[1], rtol=1e-6, atol=1e-9)
    for key, value in whole[4].items():
        assert split[4][key] == pytest.approx(value, rel=1e-5, abs=1e-7), key


@pytest.mark.parametrize("case", [CASES[0], CASES[4], CASES[11]], ids=_case_id)
def test_teacher_equal_to_student_gives_zero_signal(case):
    cfg = OPDConfig(**case)
    student, _, ids, mask, outcome = make_batch(seed=3)
    loss, grad, _, targets, _ = run_step(cfg, student, student, ids, mask, outcome)
    assert abs(loss) < 1e-6 and grad.abs().max() < 1e-6
    if targets.adv_NTC is not None:
        assert targets.adv_NTC.abs().max() < 1e-6


def test_importance_sampling_equals_ppo_on_policy_and_is_unclipped_off_policy():
    student, teacher, ids, mask, outcome = make_batch(seed=5)
    ppo = run_step(OPDConfig(top_k=3), student, teacher, ids, mask, outcome)
    plain = run_step(OPDConfig(top_k=3, policy_loss="importance_sampling"), student, teacher, ids, mask, outcome)
    assert plain[0] == pytest.approx(ppo[0], rel=1e-6)
    torch.testing.assert_close(plain[1], ppo[1])
    # off-policy (old log-probs moved by 0.5): the surrogate is -r A with r = e^0.5 for every slot, never clipped
    cfg = OPDConfig(top_k=3, policy_loss="importance_sampling")
    targets = ppo[3]
    targets.old_lp_NTC = targets.old_lp_NTC - 0.5
    logits = student.detach().clone().requires_grad_(True)
    loss, metrics = step_loss(cfg, targets, logits, totals=loss_totals(targets, T))
    adv = torch.where(targets.valid_NTC, targets.adv_NTC, torch.zeros_like(targets.adv_NTC))
    want = -(adv * math.exp(0.5)).sum(-1)
    assert float(loss.detach()) == pytest.approx(float((want * mask).sum() / mask.sum()), rel=1e-4)
    assert metrics["actor/pg_clipfrac"] == 0.0 and metrics["actor/ratio_mean"] == pytest.approx(math.exp(0.5))
    clipped = step_loss(OPDConfig(top_k=3), targets, logits, totals=loss_totals(targets, T))[1]
    assert clipped["actor/pg_clipfrac"] > 0  # the same targets under PPO do clip


def test_missing_inputs_are_named():
    student, teacher, ids, mask, outcome = make_batch(seed=1)
    cfg = OPDConfig(top_k=3)
    reads = StepReads(student=read_student(cfg, student, ids))
    with pytest.raises(ValueError, match="needs the teacher's reads"):
        build_targets(cfg, reads, response_ids_NT=ids, response_mask_NT=mask)
    fmt = OPDConfig(top_k=0, enable_format_reward=True)
    reads.teacher = read_teacher(fmt, teacher, ids, read_student(fmt, student, ids).topk_ids_NTK)
    with pytest.raises(ValueError, match="needs has_box_N"):
        build_targets(
            fmt, StepReads(read_student(fmt, student, ids), reads.teacher), response_ids_NT=ids, response_mask_NT=mask
        )


def test_loss_from_precomputed_target_logprobs_equals_the_logits_path():
    """An engine whose logits live in a hook passes the targets' log-probs instead of the logits: same loss, same
    gradient."""
    from opd.core.step import target_logprobs

    cfg = OPDConfig(top_k=3, adv_estimator="token_reward_direct_plus_grpo", use_kl=True)
    student, teacher, ids, mask, outcome = make_batch(seed=11)
    *_, targets, _ = run_step(
        OPDConfig(top_k=3, adv_estimator="token_reward_direct_plus_grpo"), student, teacher, ids, mask, outcome
    )
    targets.ref_lp_NTC = targets.old_lp_NTC - 0.2
    totals = loss_totals(targets, T)
    results = []
    for via_lp in (False, True):
        logits = student.detach().clone().requires_grad_(True)
        if via_lp:
            loss, m = step_loss(cfg, targets, None, totals=totals, lp_NTC=target_logprobs(cfg, logits, targets))
        else:
            loss, m = step_loss(cfg, targets, logits, totals=totals)
        loss.backward()
        results.append((float(loss.detach()), logits.grad, m))
    assert results[0][0] == results[1][0] and results[0][2] == results[1][2]
    torch.testing.assert_close(results[0][1], results[1][1], rtol=0, atol=0)
    with pytest.raises(ValueError, match="needs the student.s logits_NTV"):
        step_loss(cfg, targets, None, totals=totals)


@pytest.mark.parametrize(
    "case",
    [
        {"top_k": -1},
        {"top_k": -1, "reward_weight_mode": "teacher_p", "loss_agg_mode": "seq-mean-token-mean"},
        {"top_k": -1, "adv_estimator": "token_reward_direct_plus_grpo", "grpo_outcome_weight": 2.0},
    ],
    ids=str,
)
def test_full_vocabulary_from_output_heads_equals_the_logits_path(case):
    """Both models' final hidden states and output embeddings in place of their logits: same loss and gradient."""
    cfg = OPDConfig(**case)
    gen = torch.Generator().manual_seed(11)
    H = 4
    s_h, t_h = (torch.randn(N, T, H, generator=gen, dtype=F64) for _ in range(2))
    s_w, t_w = (torch.randn(V, H, generator=gen, dtype=F64) for _ in range(2))
    _, _, ids, mask, outcome = make_batch(seed=2)
    t_logits = t_h @ t_w.T
    with torch.no_grad():
        s_logits = s_h @ s_w.T
        reads = StepReads(student=read_student(cfg, s_logits, ids))
        reads.teacher = read_teacher(cfg, t_logits, ids, reads.student.topk_ids_NTK)
    targets = build_targets(
        cfg, reads, response_ids_NT=ids, response_mask_NT=mask, group_index_N=GROUPS, outcome_scores_N=outcome
    )
    totals = loss_totals(targets, norm_length=T)
    results = []
    for via_heads in (False, True):
        h, w = s_h.clone().requires_grad_(True), s_w.clone().requires_grad_(True)
        logits = h @ w.T if (not via_heads or needs_student_logits(cfg, targets)) else None
        if via_heads:
            heads = {"student_head": OutputHead(h, w), "teacher_head": OutputHead(t_h, t_w)}
            loss, metrics = step_loss(cfg, targets, logits, totals=totals, **heads)
        else:
            loss, metrics = step_loss(cfg, targets, logits, totals=totals, teacher_logits_NTV=t_logits)
        loss.backward()
        results.append((float(loss), metrics, h.grad, w.grad))
    (loss_a, m_a, gh_a, gw_a), (loss_b, m_b, gh_b, gw_b) = results
    # the logits path reads float32 chunks, the heads path keeps float64 heads in float64: float32-level agreement
    assert loss_b == pytest.approx(loss_a, rel=1e-5, abs=1e-6)
    assert m_b["actor/full_vocab_loss"] == pytest.approx(m_a["actor/full_vocab_loss"], rel=1e-5, abs=1e-6)
    torch.testing.assert_close(gh_b, gh_a, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw_b, gw_a, rtol=1e-5, atol=1e-6)
    assert gh_a.abs().max() > 1e-3
    assert needs_student_logits(cfg, targets) == (targets.adv_NTC is not None)


@pytest.mark.parametrize("case", [{"top_k": 4}, {"top_k": 0}, {"top_k": -1, "teacher_temperature": 0.7}], ids=str)
def test_reads_from_output_heads_equal_the_logits_reads(case):
    """`read_student` / `read_teacher` from an `OutputHead` (logits built chunk by chunk) equal the logits reads."""
    cfg = OPDConfig(**case, chunk_size=3)
    gen = torch.Generator().manual_seed(5)
    H = 6
    s_h, t_h = (torch.randn(N, T, H, generator=gen, dtype=F64) for _ in range(2))
    s_w, t_w = (torch.randn(V, H, generator=gen, dtype=F64) for _ in range(2))
    t_b = torch.randn(V, generator=gen, dtype=F64)
    _, _, ids, _, _ = make_batch(seed=3)
    want_s = read_student(cfg, s_h @ s_w.T, ids)
    got_s = read_student(cfg, OutputHead(s_h, s_w), ids)
    want_t = read_teacher(cfg, t_h @ t_w.T + t_b, ids, want_s.topk_ids_NTK)
    got_t = read_teacher(cfg, OutputHead(t_h, t_w, t_b), ids, got_s.topk_ids_NTK)
    for want, got in ((want_s, got_s), (want_t, got_t)):
        assert torch.equal(want.topk_ids_NTK, got.topk_ids_NTK)
        for name in ("lp_NT", "entropy_NT", "topk_lp_NTK", "lp_at_other_NTK"):
            a, b = getattr(want, name), getattr(got, name)
            assert (a is None) == (b is None), name
            if a is not None:
                torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)
    assert got_t.lp_at_other_NTK.shape == (N, T, got_s.topk_ids_NTK.shape[-1])


@pytest.mark.parametrize(
    "case",
    [
        CASES[0],
        CASES[2],
        CASES[5],
        CASES[9],
        CASES[10],
        dict(top_k=3, adv_estimator="token_reward_direct", use_kl=True, kl_coef=0.3),
        dict(top_k=-1, adv_estimator="token_reward_direct_plus_grpo", grpo_outcome_weight=2.0),
    ],
    ids=_case_id,
)
def test_loss_from_the_students_output_head_equals_the_logits_path(case):
    """The student's `OutputHead` in place of its logits (slot log-probs from hidden states, tail bucket and extra
    sampled slot included): the same loss, metrics and gradients w.r.t. hidden states and output embedding."""
    cfg = OPDConfig(temperature=0.9, chunk_size=4, **case)
    gen = torch.Generator().manual_seed(len(_case_id(case)))
    H = 5
    s_h, t_h = (torch.randn(N, T, H, generator=gen, dtype=F64) for _ in range(2))
    s_w, t_w = (torch.randn(V, H, generator=gen, dtype=F64) for _ in range(2))
    s_b = torch.randn(V, generator=gen, dtype=F64)
    _, _, ids, mask, outcome = make_batch(seed=4)
    t_logits = t_h @ t_w.T
    with torch.no_grad():
        s_logits = s_h @ s_w.T + s_b
        reads = StepReads(student=read_student(cfg, s_logits, ids))
        reads.teacher = read_teacher(cfg, t_logits, ids, reads.student.topk_ids_NTK)
        reads.student.lp_at_other_NTK = read_student_at_teacher(cfg, s_logits, reads.teacher.topk_ids_NTK)
    targets = build_targets(
        cfg, reads, response_ids_NT=ids, response_mask_NT=mask, group_index_N=GROUPS, outcome_scores_N=outcome
    )
    if cfg.use_kl:
        targets.ref_lp_NTC = target_logprobs(cfg, s_logits + 0.3 * torch.randn(N, T, V, generator=gen), targets)
    totals = loss_totals(targets, norm_length=T)
    results = []
    for via_head in (False, True):
        h, w, b = (x.clone().requires_grad_(True) for x in (s_h, s_w, s_b))
        teacher = {"teacher_head": OutputHead(t_h, t_w)} if via_head else {"teacher_logits_NTV": t_logits}
        if via_head:
            head = OutputHead(h, w, b)
            loss, metrics = step_loss(cfg, targets, head, totals=totals, student_head=head, **teacher)
        else:
            loss, metrics = step_loss(cfg, targets, h @ w.T + b, totals=totals, **teacher)
        loss.backward()
        results.append((float(loss), metrics, h.grad, w.grad, b.grad))
    (loss_a, m_a, *grads_a), (loss_b, m_b, *grads_b) = results
    # the logits path reads float32 chunks, a float64 head stays float64: float32-level agreement (the tail bucket's
    # log(1 - covered mass) amplifies it, hence the brute-force test's tolerances)
    assert loss_b == pytest.approx(loss_a, rel=1e-4, abs=1e-6)
    assert m_b.keys() == m_a.keys()
    for key in m_a:
        assert m_b[key] == pytest.approx(m_a[key], rel=1e-4, abs=1e-5), key
    for got, want in zip(grads_b, grads_a):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert grads_a[0].abs().max() > 1e-3  # a real signal was compared
    assert (grads_b[0][mask == 0] == 0).all()  # padded positions get no gradient from the head path either


def test_loss_from_a_student_head_without_the_teachers_is_refused_for_the_full_vocabulary():
    cfg = OPDConfig(top_k=-1)
    gen = torch.Generator().manual_seed(1)
    s_h, s_w = torch.randn(N, T, 3, generator=gen, dtype=F64), torch.randn(V, 3, generator=gen, dtype=F64)
    _, teacher, ids, mask, outcome = make_batch(seed=1)
    with torch.no_grad():
        reads = StepReads(student=read_student(cfg, s_h @ s_w.T, ids))
        reads.teacher = read_teacher(cfg, teacher, ids, reads.student.topk_ids_NTK)
    targets = build_targets(cfg, reads, response_ids_NT=ids, response_mask_NT=mask, group_index_N=GROUPS)
    with pytest.raises(ValueError, match="teacher's OutputHead"):
        step_loss(cfg, targets, OutputHead(s_h, s_w), totals=loss_totals(targets, T), teacher_logits_NTV=teacher)
