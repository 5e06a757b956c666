"""The local engine's `collate` (list-built rows) against the per-row tensor writes it replaced."""

import pytest
import torch

from opd.engines.local.rollout import collate


def _reference(prompts, responses, group_index, pad_id):
    n = len(prompts)
    P = max(len(p) for p in prompts)
    T = max(1, max(len(r) for r in responses))
    ids = torch.full((n, P + T), pad_id, dtype=torch.long)
    attn = torch.zeros((n, P + T), dtype=torch.long)
    resp = torch.zeros((n, T), dtype=torch.long)
    mask = torch.zeros((n, T), dtype=torch.float32)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        ids[i, P - len(p) : P] = torch.as_tensor(p, dtype=torch.long)
        attn[i, P - len(p) : P] = 1
        if r:
            ids[i, P : P + len(r)] = torch.as_tensor(r, dtype=torch.long)
            attn[i, P : P + len(r)] = 1
            resp[i, : len(r)] = torch.as_tensor(r, dtype=torch.long)
            mask[i, : len(r)] = 1.0
    return ids, attn, resp, mask, torch.as_tensor(group_index, dtype=torch.long), P


def _case(seed, prompt_lens, resp_lens):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, 150_000, (n,), generator=g).tolist() for n in prompt_lens]
    responses = [torch.randint(0, 150_000, (n,), generator=g).tolist() for n in resp_lens]
    return prompts, responses


@pytest.mark.parametrize(
    "prompt_lens, resp_lens",
    [
        ([20, 17, 23, 20, 1, 9, 20, 22], [32, 5, 32, 0, 1, 32, 17, 32]),  # mixed, one empty response
        ([4], [6]),  # a single row
        ([4], [0]),  # a single row with an empty response
        ([3, 5, 2], [0, 0, 0]),  # every response empty: one masked column
        ([6, 6], [3, 3]),  # no padding at all
    ],
)
@pytest.mark.parametrize("pad_id", [0, 7, 151_643])
def test_collate_equals_the_per_row_reference(prompt_lens, resp_lens, pad_id):
    prompts, responses = _case(len(prompt_lens) + pad_id, prompt_lens, resp_lens)
    groups = [i // 2 for i in range(len(prompts))]
    got = collate(prompts, responses, groups, pad_id)
    want = _reference(prompts, responses, groups, pad_id)
    tensors = [got.input_ids_NL, got.attention_mask_NL, got.response_ids_NT, got.response_mask_NT, got.group_index_N]
    for a, b in zip(tensors, want[:5]):
        assert a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()
        assert torch.equal(a, b)
    assert got.prompt_width == want[5]
    # tuples (the trainer's prompt keys) and tensors lay out the same
    again = collate([tuple(p) for p in prompts], [torch.tensor(r, dtype=torch.long) for r in responses], groups, pad_id)
    assert torch.equal(again.input_ids_NL, got.input_ids_NL) and torch.equal(again.response_ids_NT, got.response_ids_NT)
