"""The engine inside the opd_hf rollout (no verl, no Ray): its log-probs are the trainer's, its sampling is exactly
the requested one (no HF top_k=50), it stops at the project's EOS, and weight sync is all-or-nothing."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from opd.engines.verl.hf_generator import HFGenerator, Sampling, sampling_from_verl

PROMPT = [1, 87, 85, 71, 84, 201, 19, 20, 21, 2, 201, 1, 67, 201]


def trainer_logprobs(model, prompt, response, temperature):
    """What verl's actor recomputes: log_softmax(logits / T) of the full sequence at the response tokens."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float() / temperature
    return logits.log_softmax(-1).gather(-1, torch.tensor(response)[:, None]).squeeze(-1)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_match_the_full_distribution(verl_assets, temperature):
    gen = HFGenerator(verl_assets["model"], seed=0)
    for _ in range(3):
        tokens, logprobs, _ = gen.generate(PROMPT, Sampling(max_new_tokens=12, temperature=temperature, top_k=0))
        ref = trainer_logprobs(gen.model, PROMPT, tokens, temperature)
        assert torch.allclose(torch.tensor(logprobs), ref, atol=1e-5), (logprobs, ref)


def test_no_default_top_k_leaks_in(verl_assets):
    """Near-uniform model, 270 tokens: HF's default top_k=50 would confine samples to 50 ids per step."""
    gen = HFGenerator(verl_assets["model"], seed=0)
    first = set()
    for _ in range(150):
        tokens, _, _ = gen.generate(PROMPT, Sampling(max_new_tokens=1, logprobs=False))
        first.add(tokens[0])
    assert len(first) > 60


def test_a_top_k_request_is_honoured_and_renormalised(verl_assets):
    gen = HFGenerator(verl_assets["model"], seed=0)
    tokens, logprobs, _ = gen.generate(PROMPT, Sampling(max_new_tokens=6, top_k=5))
    full = trainer_logprobs(gen.model, PROMPT, tokens, 1.0)
    assert (torch.tensor(logprobs) > full + 1.0).all()  # renormalised over 5 of ~270 near-equal tokens


def test_greedy_is_argmax_and_stops_after_the_first_eos(verl_assets):
    gen = HFGenerator(verl_assets["model"], seed=0)
    tokens, _, finish = gen.generate(PROMPT, Sampling(max_new_tokens=10, temperature=0.0))
    ids = PROMPT + tokens
    with torch.no_grad():
        logits = gen.model(input_ids=torch.tensor([ids])).logits[0, len(PROMPT) - 1 : -1]
    assert logits.argmax(-1).tolist() == tokens
    assert finish == ("stop" if tokens[-1] in gen.eos_ids else "length")
    gen.eos_ids = [tokens[2]]  # pretend the third greedy token is an EOS: the response ends at its first occurrence
    cut, logprobs, finish = gen.generate(PROMPT, Sampling(max_new_tokens=10, temperature=0.0))
    assert cut == tokens[: tokens.index(tokens[2]) + 1] and finish == "stop" and len(logprobs) == len(cut)


def test_random_init_needs_weights_and_sync_is_all_or_nothing(verl_assets):
    gen = HFGenerator(verl_assets["model"], random_init=True, seed=3)
    with pytest.raises(RuntimeError, match="has not received"):
        gen.generate(PROMPT, Sampling(max_new_tokens=2))
    trained = HFGenerator(verl_assets["other"]).model.state_dict()
    with pytest.raises(KeyError, match="not sent"):
        gen.load_weights({k: v for k, v in trained.items() if "layers.1." not in k})
    with pytest.raises(KeyError, match="does not have"):
        gen.load_weights({**trained, "extra.weight": torch.zeros(1)})
    assert gen.load_weights({k: v for k, v in trained.items() if k != "lm_head.weight"}) > 0  # tied: one name is enough
    ref = HFGenerator(verl_assets["other"])
    a = gen.generate(PROMPT, Sampling(max_new_tokens=8, temperature=0.0))
    b = ref.generate(PROMPT, Sampling(max_new_tokens=8, temperature=0.0))
    assert a[0] == b[0] and torch.allclose(torch.tensor(a[1]), torch.tensor(b[1]), atol=1e-6)


ROLLOUT_CONFIG = SimpleNamespace(max_model_len=None, prompt_length=48, response_length=16, ignore_eos=False)


def test_verl_sampling_params_map_to_the_full_distribution():
    """What verl's agent loop sends: top_k=-1 (vLLM's "off") must become 0 (HF's "off"), never HF's default 50."""
    s = sampling_from_verl(
        ROLLOUT_CONFIG,
        {"temperature": 1.0, "top_p": 1.0, "top_k": -1, "repetition_penalty": 1.0, "logprobs": True},
        prompt_len=30,
    )
    assert s == Sampling(max_new_tokens=16, temperature=1.0, top_p=1.0, top_k=0, repetition_penalty=1.0, logprobs=True)
    assert sampling_from_verl(ROLLOUT_CONFIG, {"top_k": None}, 30).top_k == 0
    assert sampling_from_verl(ROLLOUT_CONFIG, {"top_k": 20}, 30).top_k == 20


def test_verl_token_budget_and_unknown_params():
    assert sampling_from_verl(ROLLOUT_CONFIG, {}, prompt_len=40).max_new_tokens == 16  # min(response, what is left)
    assert sampling_from_verl(ROLLOUT_CONFIG, {"max_tokens": 100}, prompt_len=60).max_new_tokens == 4  # 64 - 60
    with pytest.raises(ValueError, match="no room"):
        sampling_from_verl(ROLLOUT_CONFIG, {}, prompt_len=64)
    with pytest.raises(ValueError, match="prompt_logprobs"):
        sampling_from_verl(ROLLOUT_CONFIG, {"prompt_logprobs": 4}, prompt_len=10)
