"""Shared fixtures for the evaluation tests: a tiny toy-world model taught a few fixed responses (CPU, ~3 s)."""

from __future__ import annotations

import pytest
import torch

RESPONSES = ["3+4=7\n\\boxed{1234}", "\\boxed{99}", "so 5 5 5 5 5"]  # correct-ish, other answer, no answer


@pytest.fixture(scope="session")
def parrot_model_dir(tmp_path_factory):
    """A 1-layer toy model trained to answer any prompt with one of RESPONSES (so samples mix right, wrong and
    unanswered), saved with its tokenizer."""
    from opd.generation import render_prompt_ids
    from opd.toy import build_tiny_model, build_toy_tokenizer, save_model

    tok = build_toy_tokenizer()
    model = build_tiny_model(tok, "tiny", seed=0)
    prompt = render_prompt_ids(tok, [{"role": "user", "content": "What is 0001 + 0002?"}])
    seqs = [prompt + tok(r, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for r in RESPONSES]
    L = max(map(len, seqs))
    ids = torch.full((len(seqs), L), tok.pad_token_id)
    labels = torch.full((len(seqs), L), -100)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        labels[i, len(prompt) : len(s)] = torch.tensor(s[len(prompt) :])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    torch.manual_seed(0)
    for _ in range(60):
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    out = tmp_path_factory.mktemp("parrot")
    save_model(model, tok, out)
    return out


@pytest.fixture(scope="session")
def yes_verifier_dir(tmp_path_factory):
    """A 1-layer toy model (long context) trained to answer any verifier prompt with CORRECT."""
    from transformers import AutoModelForCausalLM

    from opd.eval.verifier import build_prompt
    from opd.generation import render_prompt_ids
    from opd.toy import build_toy_tokenizer, save_model, tiny_config

    tok = build_toy_tokenizer()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(tok, "tiny", max_positions=2048), dtype=torch.float32)
    text = build_prompt("What is 1 + 1?", "2", "one plus one is two")
    prompt = render_prompt_ids(tok, [{"role": "user", "content": text}])
    target = tok("CORRECT", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ids = torch.tensor([prompt + target])
    labels = torch.tensor([[-100] * len(prompt) + target])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(30):
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    out = tmp_path_factory.mktemp("verifier")
    save_model(model, tok, out)
    return out
