"""One optimiser and LR schedule for `opd train` and `opd sft`: hand-computed values for both tools' settings, and
the demo's settings reproduce exactly what each tool computed before the two were merged."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from opd.optim import lr_factor, make_optimizer, make_scheduler, warmup_steps


def _lrs(total: int, warmup_ratio: float, min_lr_ratio: float = 0.0, kind: str = "cosine") -> list[float]:
    opt = make_optimizer(torch.nn.Linear(2, 2), lr=1.0, betas=(0.9, 0.999), weight_decay=0.0)
    sched = make_scheduler(opt, kind=kind, total_steps=total, warmup_ratio=warmup_ratio, min_lr_ratio=min_lr_ratio)
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


# 10 steps, warmup 0.2 -> 2 steps; then (1 + cos(pi * j / 8)) / 2 for j = 0..7, by hand
_COSINE_8 = [1.0, 0.9619397663, 0.8535533906, 0.6913417162, 0.5, 0.3086582838, 0.1464466094, 0.0380602337]


def test_opd_train_schedule_by_hand():
    """`opd train`: cosine to 0 (min_lr_ratio 0)."""
    assert _lrs(10, 0.2) == pytest.approx([0.5, 1.0, *_COSINE_8], abs=1e-9)
    assert _lrs(4, 0.03, kind="constant") == [1.0] * 4  # the engine's default schedule


def test_opd_sft_schedule_by_hand(tmp_path):
    """`opd sft`: cosine to min_lr_ratio (0.1), through train_sft itself (each log's lr is the next step's)."""
    from opd.sft.trainer import SFTConfig, encode_dataset, train_sft
    from opd.toy import build_tiny_model, build_toy_tokenizer, sample_problems, sft_messages

    expected = [0.5, 1.0, *(0.1 + 0.9 * c for c in _COSINE_8)]
    assert _lrs(10, 0.2, 0.1) == pytest.approx(expected, abs=1e-9)
    tok = build_toy_tokenizer()
    data = encode_dataset(tok, [m["messages"] for m in sft_messages(sample_problems(4, 0))], max_length=200)
    logs = train_sft(
        build_tiny_model(tok, "tiny", seed=0),
        data,
        SFTConfig(lr=1e-3, steps=10, batch_size=2, warmup_ratio=0.2, log_every=1, progress=False),
        pad_token_id=tok.pad_token_id,
    )
    assert [r["lr"] / 1e-3 for r in logs[:-1]] == pytest.approx(expected[1:], abs=1e-9)


def test_warmup_is_the_floor_of_the_ratio():
    cases = {(100, 0.03): 3, (4, 0.25): 1, (12, 0.05): 0, (50, 0.05): 2, (40, 0.05): 2, (6, 0.05): 0}
    assert {key: warmup_steps(*key) for key in cases} == cases
    assert warmup_steps(100, 0.29) == 29  # 0.29 * 100 = 28.999999999999996 in floats
    assert _lrs(4, 0.0) == pytest.approx([1.0, *((1 + math.cos(math.pi * s / 4)) / 2 for s in (1, 2, 3))])


def _old_sft_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """opd sft's schedule before opd.optim (verbatim), the reference for the demo's SFT stages."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@pytest.mark.parametrize("total", [1000, 1500, 6, 4, 40, 50, 12, 2])  # demo teacher / cold start (full, --tiny), tests
def test_demo_sft_settings_reproduce_the_old_schedule_exactly(total):
    opt = make_optimizer(torch.nn.Linear(2, 2), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.01, decay_1d_params=False)
    sched = make_scheduler(opt, kind="cosine", total_steps=total, warmup_ratio=0.05, min_lr_ratio=0.1)
    warmup = int(0.05 * total)
    assert [sched.lr_lambdas[0](s) for s in range(total)] == [
        _old_sft_factor(s, total, warmup, 0.1) for s in range(total)
    ]


def test_param_groups_of_both_tools():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2, bias=False))
    model[0].bias.requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    # opd train: one group, every trainable parameter decayed (torch's default)
    opt = make_optimizer(model, lr=0.1, betas=(0.9, 0.999), weight_decay=0.01)
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["params"] == trainable
    assert opt.param_groups[0]["weight_decay"] == 0.01 and opt.param_groups[0]["betas"] == (0.9, 0.999)
    # opd sft: matrices decayed, 1-D parameters (biases, norms) not, in this group order
    opt = make_optimizer(model, lr=0.1, betas=(0.9, 0.95), weight_decay=0.01, decay_1d_params=False)
    decay, no_decay = opt.param_groups
    assert decay["params"] == [model[0].weight, model[2].weight] and decay["weight_decay"] == 0.01
    assert no_decay["params"] == [model[1].weight, model[1].bias] and no_decay["weight_decay"] == 0.0
    assert lr_factor(0, 10, 0) == 1.0
    with pytest.raises(ValueError, match="unknown LR schedule"):
        make_scheduler(opt, kind="linear", total_steps=2, warmup_ratio=0.0)


def test_clip_grad_norm_is_accurate_and_clips_like_torch():
    from opd.optim import NORM_CHUNK, clip_grad_norm

    gen = torch.Generator().manual_seed(0)
    shapes = [(151_936, 8), (NORM_CHUNK + 3,), (5,)]  # a long tensor, a partial last chunk, a tiny one
    grads = [torch.randn(*s, generator=gen) * 1e-4 for s in shapes]
    want = float(torch.sqrt(sum(g.double().square().sum() for g in grads)))

    def params():
        out = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
        for p, g in zip(out, grads):
            p.grad = g.clone()
        return out

    ours = params()
    assert clip_grad_norm(ours, 1.0) == pytest.approx(want, rel=1e-6)  # float32 partial norms; no clipping here
    assert all(torch.equal(p.grad, g) for p, g in zip(ours, grads))
    clipped = params()
    clip_grad_norm(clipped, want / 4)
    for p, g in zip(clipped, grads):  # torch's rule, coefficient max_norm / (norm + 1e-6), at the exact norm
        torch.testing.assert_close(p.grad, g * (want / 4 / (want + 1e-6)), rtol=1e-6, atol=0)
    torch_norm = float(torch.nn.utils.clip_grad_norm_(params(), 1.0))
    assert abs(clip_grad_norm(params(), 1.0) - want) <= abs(torch_norm - want)
    assert clip_grad_norm([torch.nn.Parameter(torch.zeros(2))], 1.0) == 0.0  # no gradient at all


def _reference_clip_grad_norm(params, max_norm):
    """clip_grad_norm as it was before the `_foreach_norm` path: ~12 ops per parameter."""
    from opd.optim import NORM_CHUNK

    def norm_squared(g):
        flat = g.detach().reshape(-1)
        whole = flat.numel() // NORM_CHUNK * NORM_CHUNK
        partial = torch.linalg.vector_norm(flat[:whole].view(-1, NORM_CHUNK).float(), dim=1)
        rest = torch.linalg.vector_norm(flat[whole:].float())
        return partial.double().square().sum() + rest.double().square()

    params = [p for p in params if p.grad is not None]
    if not params:
        return 0.0
    total = torch.stack([norm_squared(p.grad).to(params[0].grad.device) for p in params]).sum().sqrt()
    if max_norm != float("inf"):
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return float(total)


@pytest.mark.parametrize(
    "case",
    ["llama_like", "single", "with_large", "chunk_multiple", "non_contiguous", "bf16", "no_grad_some", "nonfinite"],
)
def test_clip_grad_norm_equals_the_per_parameter_reference_bitwise(case):
    from opd.optim import NORM_CHUNK, clip_grad_norm

    gen = torch.Generator().manual_seed(len(case))
    shapes = {
        "llama_like": [(273, 64), (64,), (64, 64), (32, 64), (128, 64), (64, 128), (64,), (273, 64)],
        "single": [(7,)],
        "with_large": [(5, 3), (NORM_CHUNK * 2 + 11,), (64,), (300, 300), (1,)],
        "chunk_multiple": [(NORM_CHUNK,), (NORM_CHUNK - 1,), (3,)],
        "non_contiguous": [(40, 30), (64, 64), (9,)],
        "bf16": [(40, 30), (64,)],
        "no_grad_some": [(4, 4), (5,), (6, 2)],
        "nonfinite": [(4, 4), (5,), (6, 2)],
    }[case]
    grads = [torch.randn(*s, generator=gen) * 10 ** float(torch.randint(-6, 2, (), generator=gen)) for s in shapes]
    if case == "non_contiguous":
        grads = [g.t() if g.ndim == 2 else g for g in grads]
    if case == "bf16":
        grads = [g.bfloat16() for g in grads]
    if case == "nonfinite":
        grads[1][2] = float("nan")

    def params():
        out = []
        for i, g in enumerate(grads):
            p = torch.nn.Parameter(torch.zeros(g.shape, dtype=g.dtype))
            if not (case == "no_grad_some" and i == 1):
                p.grad = g.clone() if g.is_contiguous() else g.t().clone().t()  # keep the layout
            out.append(p)
        return out

    want = _reference_clip_grad_norm(params(), float("inf"))
    got = clip_grad_norm(params(), float("inf"))
    assert got == want or (got != got and want != want)  # bitwise the same float64 (nan for nan gradients)
    # clipping below, exactly at, and above the norm: the same gradients, bit for bit
    for max_norm in (want / 3, want, want * (1 + 1e-6) + 1e-6, want * 2, 1.0):
        if want != want and max_norm != 1.0:
            continue
        ref, ours = params(), params()
        _reference_clip_grad_norm(ref, max_norm)
        clip_grad_norm(ours, max_norm)
        for a, b in zip(ref, ours):
            assert (a.grad is None and b.grad is None) or torch.equal(a.grad.nan_to_num(7.0), b.grad.nan_to_num(7.0))
            assert a.grad is None or a.grad.stride() == b.grad.stride()


@pytest.mark.parametrize(
    "decay_1d_params, betas, weight_decay", [(True, (0.9, 0.999), 0.01), (False, (0.9, 0.95), 0.1)]
)
def test_make_optimizer_steps_bitwise_like_torchs_for_loop_adamw(decay_1d_params, betas, weight_decay):
    """make_optimizer uses foreach AdamW for float32 CPU parameters: bit for bit the for-loop implementation (torch's
    CPU default) over several scheduled steps, with gradients of many magnitudes, zeros and a frozen parameter."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Embedding(273, 64), torch.nn.Linear(64, 128), torch.nn.LayerNorm(128), torch.nn.Linear(128, 273)
    )
    model[2].bias.requires_grad_(False)
    twin = copy.deepcopy(model)
    opt = make_optimizer(model, lr=1e-3, betas=betas, weight_decay=weight_decay, decay_1d_params=decay_1d_params)
    assert all(group["foreach"] is True for group in opt.param_groups)
    ref_params = [p for p in twin.parameters() if p.requires_grad]
    if decay_1d_params:
        ref = torch.optim.AdamW(ref_params, lr=1e-3, betas=betas, weight_decay=weight_decay, foreach=False)
    else:
        groups = [
            {"params": [p for p in ref_params if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in ref_params if p.ndim < 2], "weight_decay": 0.0},
        ]
        ref = torch.optim.AdamW(groups, lr=1e-3, betas=betas, foreach=False)
    schedulers = [make_scheduler(o, kind="cosine", total_steps=8, warmup_ratio=0.25) for o in (opt, ref)]
    gen = torch.Generator().manual_seed(1)
    for step in range(8):
        for p, q in zip(model.parameters(), twin.parameters()):
            if p.requires_grad:
                scale = 10 ** float(torch.randint(-8, 1, (), generator=gen))
                p.grad = torch.randn(p.shape, generator=gen) * scale
                if step == 2:
                    p.grad.view(-1)[::3] = 0.0
                q.grad = p.grad.clone()
        opt.step()
        ref.step()
        for s in schedulers:
            s.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
    for p, q in zip(opt.state, ref.state):
        assert all(torch.equal(opt.state[p][k], ref.state[q][k]) for k in ("step", "exp_avg", "exp_avg_sq"))
    # bf16 (foreach rounds its scalars to bf16): torch's own default
    assert make_optimizer(model.bfloat16(), lr=1e-3, betas=betas, weight_decay=0.0).param_groups[0]["foreach"] is None
