"""The teacher's output head for the full vocabulary on verl: read from its checkpoint, captured at its output layer,
and refused in one line when it cannot serve."""

from __future__ import annotations

import shutil

import pytest
import torch

from opd.engines.verl import heads
from opd.engines.verl.heads import HeadError, capture_output_layer, captured_hidden, find_output_embedding


def test_the_embedding_is_read_from_the_checkpoint(verl_assets):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(verl_assets["model"], dtype=torch.float32)
    found = find_output_embedding(verl_assets["model"])
    assert found["weight"][1] == "model.embed_tokens.weight" and "bias" not in found  # tied: the input embedding
    weight, bias = heads.output_embedding(verl_assets["model"], 100, torch.device("cpu"))
    assert bias is None and torch.equal(weight, model.get_output_embeddings().weight[:100])


def test_the_capture_gives_the_hidden_states_of_the_logits(verl_assets):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(verl_assets["model"], dtype=torch.float32)
    capture_output_layer(model)
    ids = torch.tensor([[5, 9, 11, 40, 7]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits / 0.5
    hidden = captured_hidden(logits, 0.5, torch.tensor([5]))
    rebuilt = hidden @ model.get_output_embeddings().weight.T / 0.5
    torch.testing.assert_close(rebuilt, logits[0], atol=1e-5, rtol=1e-5)
    with pytest.raises(HeadError, match="were not captured"):  # one capture serves one read
        captured_hidden(logits, 0.5, torch.tensor([5]))


def test_logits_that_are_not_the_output_layers_are_refused(verl_assets):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(verl_assets["model"], dtype=torch.float32)
    capture_output_layer(model)
    ids = torch.tensor([[5, 9, 11, 40, 7]])
    with torch.no_grad():
        capped = 2.0 * torch.tanh(model(input_ids=ids).logits / 2.0)  # a final soft-cap, as some models have
    with pytest.raises(HeadError) as err:
        captured_hidden(capped, 1.0, torch.tensor([5]))
    assert "not its output layer applied to its final hidden states" in str(err.value) and "\n" not in str(err.value)


def test_a_checkpoint_without_safetensors_is_refused(verl_assets, tmp_path):
    folder = tmp_path / "teacher"
    folder.mkdir()
    shutil.copy(f"{verl_assets['model']}/config.json", folder / "config.json")
    with pytest.raises(HeadError) as err:
        find_output_embedding(str(folder))
    assert "reads the teacher's output embedding from safetensors" in str(err.value) and "\n" not in str(err.value)
