"""Chunked logits kernels (opd.core.logits) against float64 brute force: values, gradients, chunking, memory."""

from __future__ import annotations

import pytest
import torch

from opd.core import logits as logits_module
from opd.core.logits import RowChunks, head_logit_stats, logit_stats, logprobs_at
from opd.core.types import OutputHead


def ref_logprobs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """float64 reference log-softmax of exactly the values the kernel sees (after any bf16 rounding)."""
    return torch.log_softmax(logits.double() / temperature, dim=-1)


def rand_logits(gen, shape, dtype=torch.float32, scale=3.0):
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)


@pytest.mark.parametrize("V,k", [(1, 1), (7, 1), (7, 3), (7, 7), (50, 5), (301, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_logit_stats_matches_float64(V, k, dtype, temperature):
    gen = torch.Generator().manual_seed(1000 * V + k)
    logits = rand_logits(gen, (3, 5, V), dtype)
    ids = torch.randint(0, V, (3, 5, 4), generator=gen)
    st = logit_stats(logits, k=k, ids_NTJ=ids, temperature=temperature, chunk_size=4)
    ref = ref_logprobs(logits, temperature)
    tol = dict(atol=2e-5, rtol=1e-5)
    # top-k values are the k largest reference log-probs; the returned ids carry exactly those log-probs
    torch.testing.assert_close(st.topk_lp_NTK.double(), ref.topk(k, dim=-1).values, **tol)
    torch.testing.assert_close(ref.gather(-1, st.topk_ids_NTK), st.topk_lp_NTK.double(), **tol)
    assert (st.topk_ids_NTK.sort(-1).values.diff(dim=-1) > 0).all(), "top-k ids must be distinct"
    torch.testing.assert_close(st.lp_at_ids_NTJ.double(), ref.gather(-1, ids), **tol)
    entropy = -(ref.exp() * ref).sum(-1)
    torch.testing.assert_close(st.entropy_NT.double(), entropy, atol=5e-5, rtol=1e-5)
    assert st.topk_lp_NTK.dtype == st.lp_at_ids_NTJ.dtype == st.entropy_NT.dtype == torch.float32


def test_logit_stats_chunked_equals_unchunked_and_is_per_row():
    gen = torch.Generator().manual_seed(1)
    logits = rand_logits(gen, (4, 9, 97), torch.bfloat16)
    ids = torch.randint(0, 97, (4, 9, 3), generator=gen)
    whole = logit_stats(logits, k=6, ids_NTJ=ids, chunk_size=10_000)
    for chunk in (1, 5, 36):
        part = logit_stats(logits, k=6, ids_NTJ=ids, chunk_size=chunk)
        for a, b in (
            (whole.topk_ids_NTK, part.topk_ids_NTK),
            (whole.topk_lp_NTK, part.topk_lp_NTK),
            (whole.lp_at_ids_NTJ, part.lp_at_ids_NTJ),
            (whole.entropy_NT, part.entropy_NT),
        ):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    # a row's result does not depend on the other rows in the batch
    one = logit_stats(logits[2:3, 4:6], k=6, ids_NTJ=ids[2:3, 4:6], chunk_size=3)
    torch.testing.assert_close(one.topk_lp_NTK, whole.topk_lp_NTK[2:3, 4:6], atol=1e-6, rtol=0)
    torch.testing.assert_close(one.entropy_NT, whole.entropy_NT[2:3, 4:6], atol=1e-6, rtol=0)


def test_logit_stats_ties_padding_and_masked_vocab():
    # integer logits: many exact ties; an all-zero row (padding: uniform); -inf entries (masked vocabulary)
    gen = torch.Generator().manual_seed(2)
    logits = torch.randint(-2, 3, (2, 6, 11), generator=gen).float()
    logits[1, 5] = 0.0
    logits[0, 0, :4] = float("-inf")
    st = logit_stats(logits, k=5, chunk_size=4)
    ref = ref_logprobs(logits, 1.0)
    torch.testing.assert_close(st.topk_lp_NTK.double(), ref.topk(5, dim=-1).values, atol=1e-6, rtol=0)
    torch.testing.assert_close(ref.gather(-1, st.topk_ids_NTK), st.topk_lp_NTK.double(), atol=1e-6, rtol=0)
    assert torch.isfinite(st.entropy_NT).all()
    assert st.entropy_NT[1, 5].item() == pytest.approx(torch.log(torch.tensor(11.0)).item(), abs=1e-6)
    p = ref.exp()
    entropy = -(p * ref.nan_to_num(neginf=0.0)).sum(-1)
    torch.testing.assert_close(st.entropy_NT.double(), entropy, atol=1e-5, rtol=0)


def test_logit_stats_k0_leaves_input_untouched():
    gen = torch.Generator().manual_seed(3)
    logits = rand_logits(gen, (2, 3, 13))
    before = logits.clone()
    st = logit_stats(logits, k=0, temperature=0.5)
    assert st.topk_ids_NTK is None and st.topk_lp_NTK is None and st.lp_at_ids_NTJ is None
    assert torch.equal(logits, before), "the kernel must work on a copy, never in place on the caller's logits"
    torch.testing.assert_close(
        logprobs_at(logits, torch.zeros(2, 3, 1, dtype=torch.long), temperature=0.5),
        ref_logprobs(logits, 0.5)[..., :1].float(),
    )
    assert torch.equal(logits, before)


@pytest.mark.parametrize(
    "bad,match",
    [
        (dict(k=14), "k=14"),
        (dict(k=2, ids_NTJ=torch.full((2, 3, 1), 13)), r"ids in \[13, 13\]"),
        (dict(k=2, ids_NTJ=torch.zeros(2, 4, 1, dtype=torch.long)), "leading dims"),
        (dict(k=2, ids_NTJ=torch.zeros(2, 3, 1)), "integer"),
        (dict(k=2, temperature=0.0), "temperature"),
        (dict(k=2, chunk_size=0), "chunk_size"),
    ],
)
def test_logit_stats_rejects_bad_input(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        logit_stats(torch.zeros(2, 3, 13), **bad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_at_value_and_gradient_match_float64(dtype, temperature):
    gen = torch.Generator().manual_seed(4)
    V = 37
    base = rand_logits(gen, (3, 4, V), dtype)
    ids = torch.randint(0, V, (3, 4, 5), generator=gen)
    ids[0, 0, 1] = ids[0, 0, 0]  # a repeated id: its gradient contributions must add up
    upstream = torch.randn(3, 4, 5, generator=gen, dtype=torch.float64)

    logits = base.clone().requires_grad_(True)
    lp = logprobs_at(logits, ids, temperature=temperature, chunk_size=5)
    (lp.double() * upstream).sum().backward()

    ref_in = base.double().requires_grad_(True)
    ref = ref_logprobs(ref_in, temperature).gather(-1, ids)
    (ref * upstream).sum().backward()

    assert lp.dtype == torch.float32 and logits.grad.dtype == dtype
    torch.testing.assert_close(lp.double(), ref.detach(), atol=2e-5, rtol=1e-5)
    grad_tol = dict(atol=2e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(logits.grad.double(), ref_in.grad, **grad_tol)


def test_logprobs_at_chunked_equals_unchunked_and_no_grad_mode():
    gen = torch.Generator().manual_seed(5)
    base = rand_logits(gen, (2, 7, 29))
    ids = torch.randint(0, 29, (2, 7, 3), generator=gen)
    grads = []
    for chunk in (1, 4, 1000):
        logits = base.clone().requires_grad_(True)
        lp = logprobs_at(logits, ids, chunk_size=chunk)
        lp.pow(2).sum().backward()
        grads.append((lp.detach(), logits.grad))
    for lp, grad in grads[1:]:
        torch.testing.assert_close(lp, grads[0][0], atol=1e-6, rtol=0)
        torch.testing.assert_close(grad, grads[0][1], atol=1e-6, rtol=0)
    with torch.no_grad():
        lp = logprobs_at(base.clone().requires_grad_(True), ids)
    assert not lp.requires_grad
    torch.testing.assert_close(lp, grads[0][0], atol=1e-6, rtol=0)


def test_logprobs_at_keeps_no_float32_vocab_tensor_for_backward():
    """The naive log_softmax(x.float()).gather() saves an [R, V] float32 tensor; ours saves only the logits."""
    N, T, V = 2, 8, 64
    logits = torch.randn(N, T, V, dtype=torch.bfloat16, requires_grad=True)
    ids = torch.randint(0, V, (N, T, 2))
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        lp = logprobs_at(logits, ids, chunk_size=4)
    big_float32 = [t for t in saved if t.dtype == torch.float32 and t.numel() >= N * T * V // 4]
    assert not big_float32, f"backward keeps float32 vocabulary-sized tensors: {[tuple(t.shape) for t in big_float32]}"
    assert any(t.dtype == torch.bfloat16 and t.numel() == N * T * V for t in saved)
    lp.sum().backward()  # and the graph still works


@pytest.mark.parametrize("chunk", [1, 4, 7, 100])
def test_row_chunks_on_strided_slices_match_flattened_rows(chunk):
    base = torch.randn(3, 9, 11)
    for x in (base, base[:, 2:-1], base[1], base[:, :, :].transpose(0, 1)):
        chunks = RowChunks(x, chunk)
        flat = x.reshape(-1, x.shape[-1])
        got = torch.cat([chunks.rows(a, b) for a, b in chunks.ranges()])
        assert torch.equal(got, flat)
    sliced = RowChunks(base[:, 2:-1], chunk)
    assert sliced.rows(0, 1).data_ptr() == base[0, 2].data_ptr(), "a chunk inside one sequence must be a view"


def test_response_slice_is_read_in_place_with_gradient():
    """The engine passes logits[:, P-1:-1]: results and gradients equal the contiguous copy's, and no copy is saved."""
    gen = torch.Generator().manual_seed(6)
    full = rand_logits(gen, (3, 10, 23), torch.bfloat16).requires_grad_(True)
    sliced = full[:, 3:-1]
    ids = torch.randint(0, 23, (3, 6, 2), generator=gen)
    st = logit_stats(sliced, k=3, ids_NTJ=ids, chunk_size=4)
    ref = logit_stats(sliced.detach().contiguous(), k=3, ids_NTJ=ids, chunk_size=4)
    assert torch.equal(st.topk_lp_NTK, ref.topk_lp_NTK) and torch.equal(st.entropy_NT, ref.entropy_NT)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        lp = logprobs_at(sliced, ids, temperature=0.9, chunk_size=4)
    assert all(
        t.untyped_storage().data_ptr() == full.untyped_storage().data_ptr() for t in saved if t.dtype == torch.bfloat16
    ), "the logits slice was copied"
    lp.sum().backward()
    ref_in = full.detach().double().requires_grad_(True)
    torch.log_softmax(ref_in[:, 3:-1] / 0.9, -1).gather(-1, ids).sum().backward()
    ref_lp = torch.log_softmax(full.detach()[:, 3:-1].double() / 0.9, -1).gather(-1, ids)
    torch.testing.assert_close(lp.double(), ref_lp, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(full.grad.double(), ref_in.grad, atol=2e-2, rtol=1e-2)
    assert (full.grad[:, :3] == 0).all() and (full.grad[:, -1] == 0).all()


# --- reads from hidden states (head_logit_stats) ----------------------------------------------------------------


def _head(gen, N, T, H, V, dtype, bias):
    hidden = (torch.randn(N, T, H, generator=gen, dtype=torch.float64)).to(dtype)
    weight = (torch.randn(V, H, generator=gen, dtype=torch.float64) * 0.7).to(dtype)
    b = (torch.randn(V, generator=gen, dtype=torch.float64)).to(dtype) if bias else None
    return hidden, weight, b


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
@pytest.mark.parametrize("bias", [False, True])
def test_head_logit_stats_matches_float64(dtype, temperature, bias):
    gen = torch.Generator().manual_seed(7)
    hidden, weight, b = _head(gen, 3, 5, 8, 61, dtype, bias)
    ids = torch.randint(0, 61, (3, 5, 4), generator=gen)
    st = head_logit_stats(hidden, weight, b, k=6, ids_NTJ=ids, temperature=temperature, chunk_size=4)
    # float64 reference on the logits the model's own head gives (its matmul runs in the head's dtype)
    ref = ref_logprobs(torch.nn.functional.linear(hidden, weight, b), temperature)
    tol = dict(atol=3e-5, rtol=1e-5)
    torch.testing.assert_close(st.topk_lp_NTK.double(), ref.topk(6, dim=-1).values, **tol)
    torch.testing.assert_close(ref.gather(-1, st.topk_ids_NTK), st.topk_lp_NTK.double(), **tol)
    torch.testing.assert_close(st.lp_at_ids_NTJ.double(), ref.gather(-1, ids), **tol)
    torch.testing.assert_close(st.entropy_NT.double(), -(ref.exp() * ref).sum(-1), atol=5e-5, rtol=1e-5)
    assert st.topk_lp_NTK.dtype == st.lp_at_ids_NTJ.dtype == st.entropy_NT.dtype == torch.float32


@pytest.mark.parametrize("chunk", [1, 4, 7, 1000])
def test_head_logit_stats_equals_logit_stats_of_the_built_logits(chunk, monkeypatch):
    gen = torch.Generator().manual_seed(3)
    hidden, weight, b = _head(gen, 2, 9, 16, 97, torch.float32, True)
    ids = torch.randint(0, 97, (2, 9, 3), generator=gen)
    logits = torch.nn.functional.linear(hidden, weight, b)
    whole = logit_stats(logits, k=5, ids_NTJ=ids, temperature=0.8)
    part = head_logit_stats(hidden, weight, b, k=5, ids_NTJ=ids, temperature=0.8, chunk_size=chunk)
    assert torch.equal(whole.topk_ids_NTK, part.topk_ids_NTK)
    for a, c in (
        (whole.topk_lp_NTK, part.topk_lp_NTK),
        (whole.lp_at_ids_NTJ, part.lp_at_ids_NTJ),
        (whole.entropy_NT, part.entropy_NT),
    ):
        torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-6)  # a chunk's matmul may block differently
    # the element cap bounds the rows of a chunk whatever chunk_size asks for: 97 logits a row, 2 rows a chunk
    monkeypatch.setattr(logits_module, "HIDDEN_CHUNK_ELEMENTS_MIN", 2 * 97)
    monkeypatch.setattr(logits_module, "HIDDEN_CHUNK_ELEMENTS", 3 * 97)
    assert logits_module.hidden_chunk_rows(chunk, 97, 4) == min(chunk, 2)  # 97 x 4 / 4 logits: the floor, 2 rows
    assert logits_module.hidden_chunk_rows(chunk, 97, 1000) == min(chunk, 3)  # a big head: the ceiling, 3 rows
    capped = head_logit_stats(hidden, weight, b, k=5, ids_NTJ=ids, temperature=0.8, chunk_size=chunk)
    torch.testing.assert_close(capped.entropy_NT, whole.entropy_NT, atol=1e-5, rtol=1e-6)


def test_head_logit_stats_rejects_bad_input():
    hidden, weight = torch.zeros(2, 3, 4), torch.zeros(13, 4)
    with pytest.raises(ValueError, match="expected ids in"):
        head_logit_stats(hidden, weight, k=2, ids_NTJ=torch.full((2, 3, 1), 13))
    with pytest.raises(ValueError, match="leading dims"):
        head_logit_stats(hidden, weight, k=2, ids_NTJ=torch.zeros(2, 4, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="k="):
        head_logit_stats(hidden, weight, k=14)
    with pytest.raises(ValueError, match="chunk_size"):
        head_logit_stats(hidden, weight, k=2, chunk_size=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk", [1, 4, 1000])
def test_logprobs_at_from_output_head_matches_float64(dtype, temperature, bias, chunk):
    """Value and the gradients w.r.t. hidden states, weight and bias equal float64 autograd through the built
    logits, with rows of zero upstream gradient (padding) and a repeated id."""
    gen = torch.Generator().manual_seed(11 + chunk)
    hidden, weight, b = _head(gen, 3, 5, 8, 61, dtype, bias)
    ids = torch.randint(0, 61, (3, 5, 4), generator=gen)
    ids[1, 2, 3] = ids[1, 2, 0]
    upstream = torch.randn(3, 5, 4, generator=gen, dtype=torch.float64)
    upstream[0, 3:] = 0  # padded positions: skipped in backward, their gradients exactly 0
    upstream[2, 1, :2] = 0  # one row with some zero slots

    def leaf(x):
        return None if x is None else x.clone().requires_grad_(True)

    ours = OutputHead(leaf(hidden), leaf(weight), leaf(b))
    lp = logprobs_at(ours, ids, temperature=temperature, chunk_size=chunk)
    (lp.double() * upstream).sum().backward()

    ref_in = [None if x is None else x.double().requires_grad_(True) for x in (hidden, weight, b)]
    ref = ref_logprobs(torch.nn.functional.linear(*ref_in), temperature).gather(-1, ids)
    (ref * upstream).sum().backward()

    assert lp.dtype == torch.float32 and ours.hidden_NTH.grad.dtype == dtype
    # bf16: the head's matmul rounds its logits to bf16 (as the model's lm_head does), so the values are compared with
    # the float64 log-softmax of those logits; the gradients are bf16
    low = dtype == torch.bfloat16
    want_lp = ref_logprobs(torch.nn.functional.linear(hidden, weight, b), temperature).gather(-1, ids) if low else ref
    torch.testing.assert_close(lp.double(), want_lp.detach(), atol=3e-5, rtol=1e-5)
    for got, want in zip((ours.hidden_NTH, ours.weight_VH, ours.bias_V), ref_in):
        if want is not None:
            tol = dict(atol=0.05, rtol=0.02) if low else dict(atol=3e-5, rtol=1e-5)
            torch.testing.assert_close(got.grad.double(), want.grad, **tol)
    assert not ours.hidden_NTH.grad[0, 3:].any()


def test_logprobs_at_from_output_head_equals_the_logits_path_and_builds_no_vocab_tensor(monkeypatch):
    """The head path gives the logits path's values and gradients (float32), and with a small element cap no
    tensor as large as the [N, T, V] logits is allocated in forward or backward."""
    gen = torch.Generator().manual_seed(12)
    N, T, H, V = 2, 16, 8, 97
    hidden, weight, b = _head(gen, N, T, H, V, torch.float32, True)
    ids = torch.randint(0, V, (N, T, 3), generator=gen)
    upstream = torch.randn(N, T, 3, generator=gen)

    h1, w1, b1 = (x.clone().requires_grad_(True) for x in (hidden, weight, b))
    (logprobs_at(torch.nn.functional.linear(h1, w1, b1), ids, temperature=0.9) * upstream).sum().backward()

    monkeypatch.setattr(logits_module, "HIDDEN_CHUNK_ELEMENTS_MIN", 4 * V)
    monkeypatch.setattr(logits_module, "HIDDEN_CHUNK_ELEMENTS", 4 * V)  # 4 rows a chunk
    h2, w2, b2 = (x.clone().requires_grad_(True) for x in (hidden, weight, b))
    biggest = []

    def watch(x):
        biggest.append(x.numel())
        return x

    real_head_chunk = logits_module._head_chunk
    monkeypatch.setattr(logits_module, "_head_chunk", lambda *a: watch(real_head_chunk(*a)))
    lp = logprobs_at(OutputHead(h2, w2, b2), ids, temperature=0.9)
    (lp * upstream).sum().backward()
    assert biggest and max(biggest) <= 4 * V < N * T * V
    tol = dict(atol=1e-5, rtol=1e-5)
    for got, want in ((h2, h1), (w2, w1), (b2, b1)):
        torch.testing.assert_close(got.grad, want.grad, **tol)


def test_logprobs_at_from_output_head_rejects_bad_ids():
    head = OutputHead(torch.zeros(2, 3, 4), torch.zeros(13, 4))
    with pytest.raises(ValueError, match="expected ids in"):
        logprobs_at(head, torch.full((2, 3, 1), 13))
    with pytest.raises(ValueError, match="leading dims"):
        logprobs_at(head, torch.zeros(2, 4, 1, dtype=torch.long))


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
        ),
    ],
)
def test_logprobs_at_from_output_head_on_device_matches_cpu(device):
    """Nothing of the head path is created on the CPU by accident: the same values and gradients on `device`."""
    gen = torch.Generator().manual_seed(13)
    hidden, weight, b = _head(gen, 2, 7, 8, 53, torch.float32, True)
    ids = torch.randint(0, 53, (2, 7, 3), generator=gen)
    upstream = torch.randn(2, 7, 3, generator=gen)
    upstream[1, 4:] = 0
    results = []
    for dev in ("cpu", device):
        leaves = [x.to(dev).requires_grad_(True) for x in (hidden, weight, b)]
        lp = logprobs_at(OutputHead(*leaves), ids.to(dev), temperature=0.8, chunk_size=3)
        (lp * upstream.to(dev)).sum().backward()
        results.append([lp.detach().cpu()] + [x.grad.cpu() for x in leaves])
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
