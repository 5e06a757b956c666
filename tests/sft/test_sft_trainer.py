"""Built-in SFT: assistant-token masking, the loss against a float64 reference, accumulation equivalence, learning."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from opd.optim import lr_factor
from opd.sft.trainer import IGNORE, SFTConfig, collate, encode_conversation, encode_dataset, token_loss_sum, train_sft
from opd.toy import Problem, build_tiny_model, build_toy_tokenizer, sample_problems, sft_messages


@pytest.fixture(scope="module")
def tok():
    return build_toy_tokenizer()


def _multi_turn():
    return [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 0001 + 0002?"},
        {"role": "assistant", "content": "1+2+0=3\n0+0+0=0\n0+0+0=0\n0+0+0=0\n\\boxed{3}"},
        {"role": "user", "content": "And again?"},
        {"role": "assistant", "content": "Yes, \\boxed{3}"},
    ]


def test_masking_matches_the_templates_generation_marks(tok):
    """Our prefix-rendering mask agrees with the independent `{% generation %}` mask of the toy template."""
    for msgs in (Problem(321, 999).messages(with_answer=True), _multi_turn()):
        ids, labels = encode_conversation(tok, msgs)
        ref = tok.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        assert ids == ref["input_ids"]
        assert [int(lab != IGNORE) for lab in labels] == ref["assistant_masks"]
        assert all(lab in (IGNORE, i) for lab, i in zip(labels, ids))
    # the kept tokens are exactly each assistant content + end-of-turn, in order
    ids, labels = encode_conversation(tok, _multi_turn())
    kept = tok.decode([lab for lab in labels if lab != IGNORE])
    assert kept == _multi_turn()[2]["content"] + tok.eos_token + _multi_turn()[4]["content"] + tok.eos_token
    # the prompt (user turns, system, markers) is never trained on
    n_prompt = len(
        tok(
            tok.apply_chat_template(_multi_turn()[:2], tokenize=False, add_generation_prompt=True),
            add_special_tokens=False,
        )["input_ids"]
    )
    assert set(labels[:n_prompt]) == {IGNORE}


def test_bad_conversations_and_templates_raise(tok):
    with pytest.raises(ValueError, match="conversation 1: .*no assistant"):
        encode_dataset(tok, [Problem(1, 2).messages(True), Problem(1, 2).messages()], max_length=100)
    weird = copy.deepcopy(tok)
    # the generation prompt differs from how an assistant turn starts: masking cannot be located
    weird.chat_template = tok.chat_template.replace(
        "{%- if add_generation_prompt -%}<|assistant|>", "{%- if add_generation_prompt -%}<|assistant|>Sure:"
    )
    with pytest.raises(ValueError, match="prefix"):
        encode_conversation(weird, Problem(1, 2).messages(True))
    enc = encode_dataset(
        tok, [m["messages"] for m in sft_messages(sample_problems(5, 0))] + [_multi_turn()], max_length=70
    )
    assert len(enc.input_ids) == 5 and enc.n_dropped_too_long == 1


def test_offsets_to_labels_and_boundary_straddle():
    from opd.sft.trainer import _labels_from_offsets

    ids, offsets = [10, 11, 12, 13], [(0, 3), (3, 5), (5, 9), (9, 9)]
    assert _labels_from_offsets(ids, offsets, [(3, 9)]) == [IGNORE, 11, 12, IGNORE]  # empty-span token never kept
    with pytest.raises(ValueError, match="across an assistant-turn boundary"):
        _labels_from_offsets(ids, offsets, [(4, 9)])


class _Logits(torch.nn.Module):
    """A stand-in model whose output logits are a parameter, to check the loss and its gradient exactly."""

    def __init__(self, logits):
        super().__init__()
        self.logits = torch.nn.Parameter(logits)

    def forward(self, input_ids, attention_mask):
        return type("Out", (), {"logits": self.logits})()


def test_token_loss_and_gradient_match_float64_reference():
    g = torch.Generator().manual_seed(0)
    B, T, V = 3, 7, 11
    logits = torch.randn(B, T, V, generator=g)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[torch.rand(B, T, generator=g) < 0.4] = IGNORE
    labels[0, 1] = 5  # make sure some position counts
    model = _Logits(logits.clone())
    loss, n = token_loss_sum(model, torch.zeros(B, T, dtype=torch.long), torch.ones(B, T), labels)
    loss.backward()
    ref_logits = logits.double().requires_grad_(True)
    ref, count = 0.0, 0
    for b in range(B):
        for t in range(T - 1):
            y = int(labels[b, t + 1])
            if y == IGNORE:
                continue
            ref = ref - (ref_logits[b, t, y] - torch.logsumexp(ref_logits[b, t], 0))
            count += 1
    ref.backward()
    assert n == count > 0
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(model.logits.grad.double(), ref_logits.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_chunked_hidden_state_loss_equals_full_logits_in_float64(tok, arch):
    """The chunked, checkpointed path (real models) == full-logits cross-entropy of a float64 copy: loss and grads."""
    from opd.sft.trainer import _has_plain_head

    model = build_tiny_model(tok, "tiny", seed=5, arch=arch)
    ref = copy.deepcopy(model).double()
    assert _has_plain_head(model)
    data = _mixed_data(tok, 4)
    ids, mask, lab = collate(data.input_ids, data.labels, tok.pad_token_id)
    loss, n = token_loss_sum(model, ids, mask, lab, chunk_tokens=7)  # several chunks, a ragged last one
    loss.backward()
    logits = ref(input_ids=ids, attention_mask=mask).logits[:, :-1]
    target = lab[:, 1:]
    ref_loss = torch.nn.functional.cross_entropy(logits[target != IGNORE], target[target != IGNORE], reduction="sum")
    ref_loss.backward()
    assert n == int((target != IGNORE).sum()) > 7
    torch.testing.assert_close(loss.double(), ref_loss.detach(), rtol=1e-5, atol=1e-4)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad.double(), q.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_collate_pads_right_and_masks():
    ids, mask, lab = collate([[1, 2, 3], [4]], [[IGNORE, 2, 3], [4]], pad_id=0)
    assert ids.tolist() == [[1, 2, 3], [4, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert lab.tolist() == [[IGNORE, 2, 3], [4, IGNORE, IGNORE]]


def test_lr_schedule_warmup_then_cosine():
    total, warm = 100, 10
    f = [lr_factor(s, total, warm, 0.1) for s in range(total + 1)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(f[:10], f[1:10]))
    assert all(a >= b for a, b in zip(f[10:], f[11:]))
    assert f[55] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f[total] == pytest.approx(0.1)


def _mixed_data(tok, n):
    convs = [m["messages"] for m in sft_messages(sample_problems(n, 1))]
    convs[1] = _multi_turn()  # different lengths: exercises padding
    return encode_dataset(tok, convs, max_length=200)


def test_micro_batching_equals_one_big_batch(tok):
    data = _mixed_data(tok, 8)
    models = [build_tiny_model(tok, "tiny", seed=3) for _ in range(2)]
    for model, micro in zip(models, (1, 8)):
        train_sft(
            model,
            data,
            SFTConfig(lr=1e-2, steps=2, batch_size=8, micro_batch_size=micro, warmup_ratio=0, progress=False),
            pad_token_id=tok.pad_token_id,
        )
    for p1, p8 in zip(*(m.parameters() for m in models)):
        torch.testing.assert_close(p1, p8, rtol=1e-4, atol=1e-5)
    assert not torch.equal(next(models[0].parameters()), next(build_tiny_model(tok, "tiny", seed=3).parameters()))


def test_sft_lowers_heldout_loss_on_toy_data(tok):
    torch.manual_seed(0)
    train = encode_dataset(tok, [m["messages"] for m in sft_messages(sample_problems(256, 1))], max_length=100)
    held = encode_dataset(tok, [m["messages"] for m in sft_messages(sample_problems(64, 2))], max_length=100)
    model = build_tiny_model(tok, "tiny", seed=0)

    def held_loss(m):
        with torch.no_grad():
            s, n = token_loss_sum(
                m,
                *collate(held.input_ids, held.labels, tok.pad_token_id)[:2],
                collate(held.input_ids, held.labels, tok.pad_token_id)[2],
            )
        return float(s) / n

    before = held_loss(model)
    logs = train_sft(
        model,
        train,
        SFTConfig(lr=1e-2, steps=40, batch_size=32, log_every=10, progress=False),
        pad_token_id=tok.pad_token_id,
    )
    after = held_loss(model)
    assert before > 4.0  # ~log(vocab) at init
    assert after < 0.5 * before
    assert logs[-1]["step"] == 40 and logs[-1]["loss"] < logs[0]["loss"]


def test_early_stop_when_metric_reaches_threshold(tok):
    data = _mixed_data(tok, 8)
    model = build_tiny_model(tok, "tiny", seed=0)
    calls = []

    def evaluate(m, step):
        calls.append(step)
        assert not m.training
        return {"accuracy": step / 10}

    m_eval_mode = []
    orig = evaluate

    def evaluate_checked(m, step):
        m_eval_mode.append(m.training)
        m.eval()
        return orig(m, step)

    logs = train_sft(
        model,
        data,
        SFTConfig(lr=1e-3, steps=50, batch_size=4, eval_every=2, stop_threshold=0.55, progress=False),
        pad_token_id=tok.pad_token_id,
        evaluate=evaluate_checked,
    )
    assert calls == [2, 4, 6] and logs[-1]["step"] == 6 and logs[-1]["stopped_early"]
    assert logs[-1]["accuracy"] == pytest.approx(0.6)
    with pytest.raises(ValueError, match="stop_threshold needs eval_every"):
        SFTConfig(stop_threshold=0.5)
    with pytest.raises(ValueError, match="micro_batch_size"):
        SFTConfig(batch_size=6, micro_batch_size=4)
