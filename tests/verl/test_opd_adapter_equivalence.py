"""The verl adapter's path equals the local engine's on the same rollouts (no Ray, no workers, seconds).

The verl side is driven the way verl's FSDP engine drives it: packed rows [1, L, V] of a micro-batch (logits divided
by the pass's temperature), the logits hook then the loss call of `hooks.actor_loss` / `hooks.teacher_loss`, hook
outputs stored as nested per-row fields, the driver's `targets.opd_targets` / `target_fields` in between, and the
loss normalised by verl's global counts (``batch_num_tokens``, ``global_batch_size``, ``dp_size``). The local side
is `opd.engines.local.scoring.score` + `build_targets` + `step_loss`. Equal: every read, the advantages (the
rewards, for the direct estimator), the dynamics metrics, the loss and its gradient, with 2 micro-batches and with
2 emulated data-parallel ranks.
"""

from __future__ import annotations

import copy

import pytest
import torch

verl = pytest.importorskip("verl")  # noqa: F841  (the hooks read verl's non-tensor data and metric types)

from tensordict import TensorDict  # noqa: E402
from verl.utils import tensordict_utils as tu  # noqa: E402

from opd.core import OPDConfig  # noqa: E402
from opd.core.step import build_targets, loss_totals, step_diagnostics, step_loss  # noqa: E402
from opd.engines.local.rollout import collate  # noqa: E402
from opd.engines.local.scoring import response_logits, score  # noqa: E402
from opd.engines.verl import fields as F  # noqa: E402
from opd.engines.verl.hooks import HookSpec, actor_loss, teacher_loss  # noqa: E402
from opd.engines.verl.settings import OPDSettings, TeacherSettings  # noqa: E402
from opd.engines.verl.targets import needs_student_at_teacher, opd_targets, slot_info, target_fields  # noqa: E402

N_PROMPTS, N_SAMPLES, MAX_RESP = 3, 2, 7


@pytest.fixture(scope="module")
def models(verl_assets):
    """Student and teacher: tiny Qwen2s of two seeds, sharpened (final norm x30) so no two logits nearly tie."""
    from transformers import AutoModelForCausalLM

    out = []
    for name in ("model", "other"):
        model = AutoModelForCausalLM.from_pretrained(verl_assets[name], dtype=torch.float32).eval()
        with torch.no_grad():
            model.model.norm.weight.mul_(30.0)
        out.append(model)
    return out


@pytest.fixture(scope="module")
def rollouts(models):
    """Prompts and responses of several lengths (one response of length 1), n = 2 per prompt, 0/1 rule scores."""
    vocab = models[0].config.vocab_size
    g = torch.Generator().manual_seed(0)
    prompts, responses = [], []
    for i in range(N_PROMPTS):
        prompt = torch.randint(3, vocab, (4 + 3 * i,), generator=g).tolist()
        for j in range(N_SAMPLES):
            length = 1 if (i, j) == (1, 0) else int(torch.randint(2, MAX_RESP + 1, (1,), generator=g))
            prompts.append(prompt)
            responses.append(torch.randint(3, vocab, (length,), generator=g).tolist())
    scores = [1.0, 0.0, 1.0, 1.0, 0.0, 1.0]
    groups = [i for i in range(N_PROMPTS) for _ in range(N_SAMPLES)]
    return prompts, responses, scores, groups


@pytest.fixture(scope="module")
def reference(models):
    """USE_KL's reference policy: the student with its final norm / 10 (a distribution apart from the student's,
    so the KL term and its gradient are not zero)."""
    ref = copy.deepcopy(models[0])
    with torch.no_grad():
        ref.model.norm.weight.mul_(0.1)
    return ref


def local_reference(reference, batch, targets, cfg):
    """USE_KL on the local engine: the reference's log-probs at the target slots."""
    from opd.engines.local.scoring import reference_logprobs

    if cfg.use_kl:
        targets.ref_lp_NTC = reference_logprobs(reference, batch, targets, cfg, token_budget=1 << 20)


def run_reference(spec, reference, store, micro_batches, temperature, extra):
    """USE_KL on verl: the reference's read pass as the teacher's workers run it (hook, then `merge_rows`)."""
    from opd.engines.verl.teacher_worker import merge_rows

    outputs = {}
    for rows in micro_batches:
        td = micro_batch(store, rows, **{F.PHASE: F.READ_REFERENCE}, **extra)
        out = actor_loss(spec, student_logits=packed_logits(reference, td, temperature), data=td)
        offsets = td["input_ids"].offsets()
        output = tu.get_tensordict(
            {k: torch.nested.nested_tensor_from_jagged(v.contiguous(), offsets) for k, v in out.items()}
        )
        output = merge_rows(output, F.REF_LP_ROW, F.TARGET_REF_LP, td["input_ids"], td["responses"])
        assert list(output.keys()) == [F.TARGET_REF_LP]
        for key in output.keys():
            outputs.setdefault(key, []).extend(output[key].unbind())
    store.update(outputs)


def assert_grad_close(ours, theirs, name):
    """Equal up to float32 summation order, which changes with the thread count. The sharpened logits make some
    gradients large (the embedding's largest entry is about 290), so the absolute tolerance is the old 1e-5 or one
    millionth of the tensor's largest entry, whichever is larger (with 2 threads one entry was 3.6e-5 off)."""
    atol = max(1e-5, 1e-6 * float(theirs.abs().max()))
    torch.testing.assert_close(ours, theirs, atol=atol, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def nested(rows):
    return torch.nested.as_nested_tensor(list(rows), layout=torch.jagged)


def store_of(prompts, responses, scores):
    """What TransferQueue holds after the rollout: nested per-sequence fields (rm_scores at the last token)."""
    rm = [torch.zeros(len(r)) for r in responses]
    for row, s in zip(rm, scores):
        row[-1] = s
    return {
        "input_ids": [torch.tensor(p + r) for p, r in zip(prompts, responses)],
        "prompts": [torch.tensor(p) for p in prompts],
        "responses": [torch.tensor(r) for r in responses],
        "response_mask": [torch.ones(len(r), dtype=torch.int64) for r in responses],
        "rm_scores": rm,
    }


def micro_batch(store, rows, **non_tensor):
    td = TensorDict({k: nested([v[i] for i in rows]) for k, v in store.items()}, batch_size=len(rows))
    tu.assign_non_tensor(td, **non_tensor)
    return td


def packed_logits(model, td, temperature, grad=False):
    """verl's packed rows: each sequence's logits back to back, divided by the temperature."""
    with torch.set_grad_enabled(grad):
        parts = [model(input_ids=ids[None]).logits[0] for ids in td["input_ids"].unbind()]
    return (torch.cat(parts) / temperature)[None]


def run_hook(fn, spec, model, store, micro_batches, temperature, phase):
    """One read pass over the micro-batches; the outputs appended to the store as nested per-row fields."""
    outputs = {}
    for rows in micro_batches:
        td = micro_batch(store, rows, **{F.PHASE: phase})
        out = fn(spec, student_logits=packed_logits(model, td, temperature), data=td)
        offsets = td["input_ids"].offsets()
        for key, value in out.items():
            assert value.shape == (int(offsets[-1]),)
            outputs.setdefault(key, []).extend(torch.nested.nested_tensor_from_jagged(value, offsets).unbind())
    store.update(outputs)


def verl_update(spec, student, store, micro_batches, temperature, extra, dp_size=1, n_rows=None):
    """The update as verl runs it on one rank: per micro-batch the logits hook, then the loss (normalised by the
    global mini-batch of `n_rows` rows); returns the summed loss."""
    total = 0.0
    all_rows = list(range(n_rows)) if n_rows else [i for rows in micro_batches for i in rows]
    batch_tokens = float(sum(store[F.LOSS_MASK][i].sum() for i in all_rows))
    for rows in micro_batches:
        td = micro_batch(
            store,
            rows,
            **{
                F.PHASE: F.UPDATE,
                "dp_size": dp_size,
                "batch_num_tokens": batch_tokens,
                "global_batch_size": len(all_rows),
            },
            **extra,
        )
        hook_out = actor_loss(spec, student_logits=packed_logits(student, td, temperature, grad=True), data=td)
        offsets = td["input_ids"].offsets()
        model_output = {k: torch.nested.nested_tensor_from_jagged(v, offsets) for k, v in hook_out.items()}
        loss, metrics = actor_loss(spec, model_output=model_output, data=td, dp_group=None)
        loss.backward()
        total += float(loss.detach())
    return total


CASES = {
    "only_stu": dict(top_k=4),
    "only_tch-teacher_p": dict(top_k=4, top_k_strategy="only_tch", reward_weight_mode="teacher_p"),
    "union-tail": dict(top_k=4, top_k_strategy="union", tail_bucket=True),
    "intersection-none-seq_norm": dict(
        top_k=4, top_k_strategy="intersection", reward_weight_mode="none", loss_agg_mode="seq-mean-token-sum-norm"
    ),
    "plus_grpo": dict(top_k=4, adv_estimator="token_reward_direct_plus_grpo", grpo_outcome_weight=0.5),
    "sampled_token": dict(top_k=0),
    "grpo": dict(top_k=0, adv_estimator="grpo"),
    "teachability_weight": dict(top_k=4, teachability="weight", teachability_threshold=0.9),
    "only_stu-use_kl": dict(top_k=4, use_kl=True, kl_coef=0.5),
    "union-tail-use_kl-k2": dict(top_k=4, top_k_strategy="union", tail_bucket=True, use_kl=True, kl_loss_type="k2"),
}


def local_engine(rollouts, student, teacher, reference, cfg):
    """The local engine's side on the same rollouts: the batch, its reads and targets (with the reference's log-probs
    when cfg.use_kl), and a copy of the student for its update."""
    prompts, responses, scores, groups = rollouts
    batch = collate(prompts, responses, groups, pad_id=0)
    reads = score(student, teacher, batch, cfg, token_budget=1 << 20)
    targets = build_targets(
        cfg,
        reads,
        response_ids_NT=batch.response_ids_NT,
        response_mask_NT=batch.response_mask_NT,
        group_index_N=batch.group_index_N,
        outcome_scores_N=torch.tensor(scores),
    )
    local_reference(reference, batch, targets, cfg)
    return batch, reads, targets, copy.deepcopy(student)


def assert_same_metrics_loss_and_gradients(
    spec, cfg, data, store, mbs, n_rows, students, reads, targets, masks, loss_local
):
    """The verl path against the local engine after the targets: every dynamics metric, then the loss and the
    gradient with 2 micro-batches on one rank and with 2 emulated dp ranks (FSDP averages their gradients).
    `reads`, `targets` and `masks` are (verl, local) pairs; `students` is (student, local copy, reference)."""
    student, student_local, reference = students
    ours_metrics = step_diagnostics(reads[0], masks[0], targets[0])
    local_metrics = step_diagnostics(reads[1], masks[1], targets[1])
    assert ours_metrics.keys() == local_metrics.keys()
    for key, value in local_metrics.items():
        assert ours_metrics[key] == pytest.approx(value, abs=2e-4), key

    lengths = data["responses"].offsets().diff()
    store.update({k: list(v.unbind()) for k, v in target_fields(targets[0], reads[0], lengths).items()})
    extra = slot_info(targets[0])
    if cfg.use_kl:
        run_reference(spec, reference, store, [[0, 1, 2, 3], [4, 5]], cfg.temperature, extra)
    student_verl = copy.deepcopy(student)
    loss_verl = verl_update(spec, student_verl, store, mbs, cfg.temperature, extra)
    assert loss_verl == pytest.approx(float(loss_local.detach()), abs=1e-5)
    assert sum(float(p.grad.abs().sum()) for p in student_local.parameters()) > 1e-3  # a real gradient is compared
    for (name, p_local), p_verl in zip(student_local.named_parameters(), student_verl.parameters()):
        assert_grad_close(p_verl.grad, p_local.grad, name)

    student_dp = copy.deepcopy(student)
    rank_losses = [
        verl_update(spec, student_dp, store, [rows], cfg.temperature, extra, dp_size=2, n_rows=n_rows)
        for rows in ([0, 1, 2], [3, 4, 5])
    ]
    assert sum(rank_losses) / 2 == pytest.approx(float(loss_local.detach()), abs=1e-5)  # verl logs the dp mean
    for (name, p_local), p_dp in zip(student_local.named_parameters(), student_dp.parameters()):
        assert_grad_close(p_dp.grad / 2, p_local.grad, name)


@pytest.mark.parametrize("overrides", list(CASES.values()), ids=list(CASES))
def test_verl_path_equals_local_engine(models, rollouts, reference, overrides):
    student, teacher = models
    prompts, responses, scores, groups = rollouts
    cfg = OPDConfig(temperature=0.7, teacher_temperature=0.9, **overrides)
    with_teacher = cfg.needs_teacher

    # --- local engine
    batch, reads_local, targets_local, student_local = local_engine(
        rollouts, student, teacher if with_teacher else None, reference, cfg
    )
    loss_local, metrics_local = step_loss(
        cfg, targets_local, response_logits(student_local, batch), totals=loss_totals(targets_local, MAX_RESP)
    )
    loss_local.backward()
    assert not cfg.use_kl or abs(metrics_local["actor/kl_loss"]) > 1e-3  # a real KL term is compared

    # --- verl adapter
    settings = OPDSettings(algo=cfg, teacher=TeacherSettings(None, 1, 1, False, None, None, None), norm_length=MAX_RESP)
    spec = HookSpec(algo=settings.hook_algo(), reads_k=settings.reads_k, norm_length=MAX_RESP)
    store = store_of(prompts, responses, scores)
    mbs = [[0, 1, 2], [3, 4, 5]]
    run_hook(actor_loss, spec, student, store, mbs, cfg.temperature, F.READ_STUDENT)
    if with_teacher:
        run_hook(teacher_loss, spec, teacher, store, [[0, 1], [2, 3, 4, 5]], cfg.teacher_temperature, F.READ_TEACHER)
    if needs_student_at_teacher(settings):
        run_hook(actor_loss, spec, student, store, mbs, cfg.temperature, F.READ_STUDENT_AT_TEACHER)
    data = TensorDict({k: nested(v) for k, v in store.items()}, batch_size=len(prompts))
    reads, targets, mask = opd_targets(settings, data, uids=[f"u{g}" for g in groups])

    # reads, rewards / advantages, diagnostics
    m = batch.response_mask_NT.bool()
    for side in ("student", "teacher") if with_teacher else ("student",):
        for name in ("lp_NT", "entropy_NT", "topk_lp_NTK", "lp_at_other_NTK"):
            ours, theirs = getattr(getattr(reads, side), name), getattr(getattr(reads_local, side), name)
            if theirs is None:
                assert ours is None, (side, name)
                continue
            torch.testing.assert_close(ours[m], theirs[m], atol=2e-5, rtol=0, msg=f"{side}.{name}")
        assert torch.equal(getattr(reads, side).topk_ids_NTK[m], getattr(reads_local, side).topk_ids_NTK[m])
    valid = targets_local.valid_NTC
    assert torch.equal(targets.valid_NTC, valid) and torch.equal(targets.ids_NTC[valid], targets_local.ids_NTC[valid])
    torch.testing.assert_close(targets.adv_NTC[valid], targets_local.adv_NTC[valid], atol=2e-5, rtol=0)
    torch.testing.assert_close(targets.old_lp_NTC[valid], targets_local.old_lp_NTC[valid], atol=2e-5, rtol=0)
    assert_same_metrics_loss_and_gradients(
        spec, cfg, data, store, mbs, len(prompts), (student, student_local, reference), (reads, reads_local),
        (targets, targets_local), (mask, batch.response_mask_NT), loss_local,
    )  # fmt: skip


# --- the full vocabulary (top_k = -1): the teacher's hidden states cross over, its head is read from its checkpoint

FULL_CASES = {
    "full-student_p": dict(top_k=-1),
    "full-teacher_p-seq_norm": dict(top_k=-1, reward_weight_mode="teacher_p", loss_agg_mode="seq-mean-token-sum-norm"),
    "full-none-plus_grpo": dict(
        top_k=-1, reward_weight_mode="none", adv_estimator="token_reward_direct_plus_grpo", grpo_outcome_weight=0.5
    ),
    "full-use_kl": dict(top_k=-1, use_kl=True, kl_coef=0.5, kl_loss_type="k1"),
}


def packed_teacher_logits(model, td, temperature, padded: bool):
    """`packed_logits`, leaving the output layer's captured input and output as one forward over the micro-batch
    would: packed rows [1, L, ...] (use_remove_padding), or right-padded rows [B, S, ...] (without it)."""
    from opd.engines.verl import heads

    hidden, raw, parts = [], [], []
    with torch.no_grad():
        for ids in td["input_ids"].unbind():
            parts.append(model(input_ids=ids[None]).logits[0])
            hidden.append(heads._CAPTURED["hidden"][0])
            raw.append(heads._CAPTURED["logits"][0])
    if padded:  # padding rows hold garbage: only each sequence's first rows may be read
        width = max(len(x) for x in hidden) + 1
        hidden, raw = ([torch.cat([x, torch.randn(width - len(x), x.shape[1])]) for x in xs] for xs in (hidden, raw))
        heads._CAPTURED.update(hidden=torch.stack(hidden), logits=torch.stack(raw))
    else:
        heads._CAPTURED.update(hidden=torch.cat(hidden)[None], logits=torch.cat(raw)[None])
    return (torch.cat(parts) / temperature)[None]


def run_teacher_full(spec, teacher, store, micro_batches, temperature):
    """The teacher's read pass as its worker runs it: the hook, then `merge_hidden` on the pass's output (every
    second micro-batch with padded rows)."""
    from opd.engines.verl.teacher_worker import merge_hidden

    outputs = {}
    for i, rows in enumerate(micro_batches):
        td = micro_batch(store, rows, **{F.PHASE: F.READ_TEACHER})
        logits = packed_teacher_logits(teacher, td, temperature, padded=i % 2 == 1)
        out = teacher_loss(spec, student_logits=logits, data=td)
        offsets = td["input_ids"].offsets()
        output = tu.get_tensordict(
            {k: torch.nested.nested_tensor_from_jagged(v.contiguous(), offsets) for k, v in out.items()}
        )
        output = merge_hidden(output, td["input_ids"], td["responses"])
        assert F.TEACHER_HIDDEN in output.keys()
        assert not [k for k in output.keys() if k.startswith(F.TEACHER_HIDDEN_ROW + "_")]  # H keys -> one field
        for key in output.keys():
            outputs.setdefault(key, []).extend(output[key].unbind())
    store.update(outputs)


@pytest.mark.parametrize("overrides", list(FULL_CASES.values()), ids=list(FULL_CASES))
def test_full_vocabulary_verl_path_equals_local_engine(models, rollouts, verl_assets, reference, overrides):
    from opd.engines.verl.heads import capture_output_layer

    student = models[0]
    teacher = copy.deepcopy(models[1])  # the capture hook stays on this copy
    capture_output_layer(teacher)
    prompts, responses, scores, groups = rollouts
    cfg = OPDConfig(temperature=0.7, teacher_temperature=0.9, **overrides)

    # --- local engine: the teacher's logits next to the student's
    batch, reads_local, targets_local, student_local = local_engine(rollouts, student, teacher, reference, cfg)
    with torch.no_grad():
        teacher_logits = response_logits(teacher, batch)
    loss_local, metrics_local = step_loss(
        cfg,
        targets_local,
        response_logits(student_local, batch),
        totals=loss_totals(targets_local, MAX_RESP),
        teacher_logits_NTV=teacher_logits,
    )
    loss_local.backward()
    assert metrics_local["actor/full_vocab_loss"] != 0.0
    assert not cfg.use_kl or abs(metrics_local["actor/kl_loss"]) > 1e-3

    # --- verl adapter: student read, teacher read (+ hidden states), exact KL pass, targets, update
    settings = OPDSettings(algo=cfg, teacher=TeacherSettings(None, 1, 1, False, None, None, None), norm_length=MAX_RESP)
    spec = HookSpec(
        algo=settings.hook_algo(),
        reads_k=settings.reads_k,
        norm_length=MAX_RESP,
        teacher_path=verl_assets["other"],
        teacher_temperature=cfg.teacher_temperature,
    )
    store = store_of(prompts, responses, scores)
    mbs = [[0, 1, 2], [3, 4, 5]]
    run_hook(actor_loss, spec, student, store, mbs, cfg.temperature, F.READ_STUDENT)
    run_teacher_full(spec, teacher, store, [[0, 1], [2, 3, 4, 5]], cfg.teacher_temperature)
    run_hook(actor_loss, spec, student, store, [[0], [1, 2, 3, 4, 5]], cfg.temperature, F.READ_FULL_KL)
    data = TensorDict({k: nested(v) for k, v in store.items()}, batch_size=len(prompts))
    reads, targets, mask = opd_targets(settings, data, uids=[f"u{g}" for g in groups])

    m = batch.response_mask_NT.bool()
    torch.testing.assert_close(reads.full_kl_NT[m], reads_local.full_kl_NT[m], atol=2e-5, rtol=0)
    assert float(reads.full_kl_NT[m].max()) > 1e-3  # two different models: a nonzero KL is compared
    assert (targets.adv_NTC is None) == (targets_local.adv_NTC is None)
    if targets_local.adv_NTC is not None:
        valid = targets_local.valid_NTC
        torch.testing.assert_close(targets.adv_NTC[valid], targets_local.adv_NTC[valid], atol=2e-5, rtol=0)
    assert_same_metrics_loss_and_gradients(
        spec, cfg, data, store, mbs, len(prompts), (student, student_local, reference), (reads, reads_local),
        (targets, targets_local), (mask, batch.response_mask_NT), loss_local,
    )  # fmt: skip
