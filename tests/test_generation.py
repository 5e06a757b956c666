"""The KV-cached sampler against transformers' own decoding on a tiny random Llama (CPU, seconds)."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from opd.generation import _apply_repetition_penalty, _filter_top_p, sample, sample_from_probs

V, EOS, PAD = 50, 1, 0


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        eos_token_id=EOS,
        pad_token_id=PAD,
    )
    return LlamaForCausalLM(cfg).eval()


def _prompts():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(2, V, (n,), generator=g).tolist() for n in (3, 7, 5, 1)]


def test_greedy_matches_unpadded_argmax_decoding(model):
    # Reference: one prompt at a time, no padding, no cache: re-run the full sequence and take the argmax.
    prompts = _prompts()
    got = sample(model, prompts, max_new_tokens=6, eos_token_ids=EOS, pad_token_id=PAD, temperature=0.0, batch_size=3)
    for p, resp in zip(prompts, got):
        seq = list(p)
        ref = []
        for _ in range(6):
            with torch.no_grad():
                nxt = int(model(torch.tensor([seq])).logits[0, -1].argmax())
            ref.append(nxt)
            seq.append(nxt)
            if nxt == EOS:
                break
        assert resp == ref


def test_sampling_is_reproducible_and_stops_at_eos(model):
    prompts = _prompts() * 3
    kw = dict(max_new_tokens=20, eos_token_ids=[EOS, 7], pad_token_id=PAD, temperature=1.5)
    a = sample(model, prompts, generator=torch.Generator().manual_seed(3), **kw)
    b = sample(model, prompts, generator=torch.Generator().manual_seed(3), **kw)
    assert a == b
    for r in a:
        assert 1 <= len(r) <= 20
        # an EOS can only be the last token; a short response must end with one
        assert all(t not in (EOS, 7) for t in r[:-1])
        if len(r) < 20:
            assert r[-1] in (EOS, 7)


def test_sampled_frequencies_follow_the_model_distribution(model):
    # One prompt, one step, many samples: empirical frequencies approach softmax(logits / T).
    p = [5, 9, 11]
    n, temp = 4000, 0.8
    got = sample(
        model,
        [p] * n,
        max_new_tokens=1,
        eos_token_ids=EOS,
        pad_token_id=PAD,
        temperature=temp,
        generator=torch.Generator().manual_seed(0),
        batch_size=4000,
    )
    counts = torch.bincount(torch.tensor([r[0] for r in got]), minlength=V).double() / n
    with torch.no_grad():
        probs = (model(torch.tensor([p])).logits[0, -1].double() / temp).softmax(-1)
    assert (counts - probs).abs().max() < 0.03


def test_sample_from_probs_draws_the_exact_distribution_with_one_uniform_per_row():
    """Frequencies over many rows match the probabilities (tiny ones included), zero-probability ids never come up,
    unnormalised rows are normalised, and a row costs one float64 uniform of the generator's stream."""
    probs = torch.tensor([0.0, 0.5, 1e-3, 0.0, 0.299, 0.2, 0.0])
    n = 200_000
    gen = torch.Generator().manual_seed(3)
    ids = sample_from_probs((probs * 3.0).expand(n, -1), gen)  # a total of 3: sampling normalises by the row's mass
    freq = torch.bincount(ids, minlength=probs.numel()).double() / n
    assert (freq[probs == 0] == 0).all()
    sd = (probs.double() * (1 - probs.double()) / n).sqrt()
    assert ((freq - probs.double()).abs() <= 5 * sd + 1e-12).all(), freq  # 5 standard errors per id
    twin = torch.Generator().manual_seed(3)
    torch.rand((n, 1), generator=twin, dtype=torch.float64)
    assert torch.equal(gen.get_state(), twin.get_state())


def test_sample_from_probs_picks_each_id_at_its_cumulative_interval():
    """Inverse-CDF: the uniform u lands on the first id whose cumulative mass exceeds u * total."""
    probs = torch.tensor([[0.25, 0.0, 0.25, 0.5]], dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    u = torch.rand((1, 1), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    want = int((probs.cumsum(-1) > u).double().argmax())
    assert int(sample_from_probs(probs, gen)) == want


def test_sample_from_probs_refuses_a_non_finite_row():
    probs = torch.tensor([[0.5, 0.5], [float("nan"), 0.5]])
    with pytest.raises(ValueError, match="not finite"):
        sample_from_probs(probs, torch.Generator().manual_seed(0))


def test_top_p_keeps_smallest_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = torch.isfinite(_filter_top_p(logits, 0.8))
    assert kept.tolist() == [[True, True, False, False]]
    kept = torch.isfinite(_filter_top_p(logits, 0.81))
    assert kept.tolist() == [[True, True, True, False]]


def test_repetition_penalty_touches_seen_tokens_only():
    logits = torch.tensor([[2.0, -2.0, 1.0, 3.0]])
    seen = torch.tensor([[1, 3, -1]])  # -1 is padding: token 0 must stay untouched
    out = _apply_repetition_penalty(logits, seen, 2.0)
    assert out.tolist() == [[2.0, -4.0, 1.0, 1.5]]


def test_render_prompt_ids_uses_the_chat_template_without_doubling_special_tokens():
    from opd.generation import render_prompt_ids
    from opd.toy.tokenizer import build_toy_tokenizer

    tok = build_toy_tokenizer()
    msgs = [{"role": "user", "content": "What is 457 + 768?"}]
    ids = render_prompt_ids(tok, msgs)
    text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert tok.decode(ids) == text  # round trip: the rendered prompt, generation marker included
    assert ids == tok(text, add_special_tokens=False)["input_ids"]
    tok.chat_template = None
    with pytest.raises(ValueError, match="no chat_template"):
        render_prompt_ids(tok, msgs)


def _observed(model, prompts, **kw):
    seen: dict[tuple[int, int], torch.Tensor] = {}

    def observe(first, step, logits, token):
        seen[(first, step)] = logits.clone()

    out = sample(model, prompts, pad_token_id=PAD, observe=observe, **kw)
    return out, seen


def test_compiled_sampler_equals_the_eager_one(model):
    """compile=True (a compiled decode step over a static KV cache): the same next-token logits at every position
    as eager decoding, so the same greedy tokens, over left-padded batches of two sizes, EOS stops, a second call
    reusing the compilation, and weights changed in place between calls (as an optimiser step does)."""
    prompts = _prompts() * 2  # batches of 3, 3 and 2 rows
    kw = dict(max_new_tokens=9, eos_token_ids=[EOS, 7], temperature=0.0, batch_size=3)
    eager, eager_logits = _observed(model, prompts, **kw)
    compiled, compiled_logits = _observed(model, prompts, compile=True, **kw)
    assert compiled == eager
    from opd import generation

    assert generation._COMPILED[model][1] == {(3, 64), (2, 64)}  # one probe per (batch, cache length) shape
    assert compiled_logits.keys() == eager_logits.keys()
    for key, want in eager_logits.items():
        torch.testing.assert_close(compiled_logits[key], want, rtol=1e-5, atol=1e-5)
    original = [p.detach().clone() for p in model.parameters()]
    try:
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1.3)
        assert _observed(model, prompts, compile=True, **kw)[0] == _observed(model, prompts, **kw)[0]
    finally:
        with torch.no_grad():
            for p, value in zip(model.parameters(), original):
                p.copy_(value)
    # sampled (temperature 1): the same random stream, the same draws where the logits agree to the last bits
    draws = dict(max_new_tokens=9, eos_token_ids=EOS, temperature=1.0, batch_size=3)
    a = sample(model, prompts, pad_token_id=PAD, generator=torch.Generator().manual_seed(5), compile=True, **draws)
    b = sample(model, prompts, pad_token_id=PAD, generator=torch.Generator().manual_seed(5), **draws)
    assert sum(x == y for x, y in zip(a, b)) >= len(a) - 1


def test_compiled_sampler_falls_back_to_eager_where_it_cannot_compile(model, monkeypatch, capsys):
    from opd import generation

    def broken(fn, **kwargs):
        def run(*args, **kw):
            raise RuntimeError("no C++ compiler")

        return run

    other = LlamaForCausalLM(model.config).eval()  # a model this process has not compiled for
    monkeypatch.setattr(generation.torch, "compile", broken)
    kw = dict(max_new_tokens=5, eos_token_ids=EOS, pad_token_id=PAD, temperature=1.0)
    a = sample(other, _prompts(), generator=torch.Generator().manual_seed(2), compile=True, **kw)
    b = sample(other, _prompts(), generator=torch.Generator().manual_seed(2), compile=True, **kw)
    c = sample(other, _prompts(), generator=torch.Generator().manual_seed(2), **kw)
    assert a == b == c
    err = capsys.readouterr().err
    assert err.count("compiled sampling is not available") == 1 and "no C++ compiler" in err


def _reference_sample_batch(model, prompts, max_new_tokens, eos, pad_id, temperature, top_p, rep_penalty, generator):
    """The eager sampler loop as it was before the EOS lookup table and list-built padding (per-row writes, isin,
    a per-step length count)."""
    from opd.generation import _DynamicDecoder

    B, L = len(prompts), max(len(p) for p in prompts)
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)
    attn = torch.zeros((B, L), dtype=torch.long)
    for i, p in enumerate(prompts):
        input_ids[i, L - len(p) :] = torch.as_tensor(list(p), dtype=torch.long)
        attn[i, L - len(p) :] = 1
    position_ids = (attn.cumsum(-1) - 1).clamp_min(0)
    seen = input_ids.masked_fill(attn == 0, -1) if rep_penalty != 1.0 else None
    decoder = _DynamicDecoder(model, attn)
    logits = decoder.prefill(input_ids, position_ids)
    next_pos = position_ids[:, -1] + 1
    done = torch.zeros(B, dtype=torch.bool)
    generated = torch.full((B, max_new_tokens), pad_id, dtype=torch.long)
    n_gen = torch.zeros(B, dtype=torch.long)
    observed = []
    for step in range(max_new_tokens):
        raw = logits
        if seen is not None:
            logits = _apply_repetition_penalty(logits.float(), seen, rep_penalty)
        if temperature == 0:
            tok = logits.argmax(-1)
        else:
            scaled = logits.float() / temperature
            if top_p < 1.0:
                scaled = _filter_top_p(scaled, top_p)
            tok = sample_from_probs(scaled.softmax(-1), generator)
        tok = torch.where(done, torch.full_like(tok, pad_id), tok)
        observed.append((step, raw.clone(), tok.clone()))
        generated[:, step] = tok
        n_gen += (~done).long()
        done = done | torch.isin(tok, eos)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        if seen is not None:
            seen = torch.cat([seen, tok.masked_fill(done, -1)[:, None]], dim=1)
        logits = decoder.step(tok, next_pos)
        next_pos = next_pos + 1
    return [row[: int(n)] for row, n in zip(generated.tolist(), n_gen.tolist())], observed


@pytest.mark.parametrize(
    "eos_ids, pad_id",
    [([], PAD), ([EOS], PAD), ([EOS, 7, 3], PAD), ([EOS], EOS), ([EOS, 10 * V], 2), ([-1, 6], PAD), (4, PAD)],
)
def test_sampler_equals_the_reference_loop(model, eos_ids, pad_id):
    """Same tokens, observed logits and tokens, and random stream as the reference loop: empty / unreachable EOS
    lists, PAD that is an EOS, single rows, one-token responses, rows finishing at different steps, and greedy,
    tempered, top-p and repetition-penalised sampling."""
    g = torch.Generator().manual_seed(len(str(eos_ids)) + pad_id)
    settings = [(1.0, 1.0, 1.0), (0.0, 1.0, 1.0), (0.7, 0.9, 1.0), (1.3, 1.0, 1.2), (2.0, 0.5, 0.8)]
    staggered = False  # some batch has rows finishing at different steps
    for (temperature, top_p, rep), (B, steps) in zip(settings * 2, [(1, 1), (1, 12), (5, 10), (7, 30), (3, 2)] * 2):
        lengths = torch.randint(1, 9, (B,), generator=g).tolist()
        prompts = [torch.randint(0, V, (n,), generator=g).tolist() for n in lengths]
        seed = int(torch.randint(0, 1000, (1,), generator=g))
        seen = []
        ours_gen, ref_gen = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        got = sample(
            model,
            prompts,
            max_new_tokens=steps,
            eos_token_ids=eos_ids,
            pad_token_id=pad_id,
            temperature=temperature,
            top_p=top_p,
            repetition_penalty=rep,
            generator=ours_gen,
            observe=lambda first, step, logits, tok: seen.append((step, logits.clone(), tok.clone())),
        )
        eos = torch.tensor([eos_ids] if isinstance(eos_ids, int) else list(eos_ids))
        want, observed = _reference_sample_batch(model, prompts, steps, eos, pad_id, temperature, top_p, rep, ref_gen)
        assert got == want
        staggered |= len({len(r) for r in got}) > 1
        assert len(seen) == len(observed)
        for (s1, l1, t1), (s2, l2, t2) in zip(seen, observed):
            assert s1 == s2 and torch.equal(l1, l2) and torch.equal(t1, t2)
        assert torch.equal(ours_gen.get_state(), ref_gen.get_state())
    assert staggered or not eos_ids
