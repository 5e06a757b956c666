"""The shared model-loading rules (`opd.models`) and samplers (`opd.sampling`): one dtype vocabulary, one device
rule, one EOS/pad rule, on a toy tokenizer and tiny models built in-process (CPU, nothing downloaded)."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from opd.models import (
    DTYPES,
    load_pair,
    load_policy,
    normalize_dtype,
    open_pair,
    resolve_device,
    special_ids,
    torch_dtype,
    vllm_dtype,
)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    from opd.toy import build_tiny_model, build_toy_tokenizer, save_model

    root = tmp_path_factory.mktemp("models")
    tok = build_toy_tokenizer()
    return {"tok": tok, "model": save_model(build_tiny_model(tok, "tiny", seed=0), tok, root / "m"), "root": root}


def test_dtype_vocabulary_and_aliases():
    assert DTYPES == ("fp32", "bf16", "fp16", "auto")
    for name in DTYPES:
        assert normalize_dtype(name) == name
    assert [normalize_dtype(n) for n in ("float32", "bfloat16", "float16")] == ["fp32", "bf16", "fp16"]
    assert torch_dtype("bfloat16", "cpu") is torch.bfloat16 and torch_dtype("fp16", "cpu") is torch.float16
    assert torch_dtype("auto", "cpu") is torch.float32 and torch_dtype("auto", torch.device("cuda:1")) is torch.bfloat16
    assert [vllm_dtype(n) for n in ("fp32", "bfloat16", "fp16", "auto")] == ["float32", "bfloat16", "float16", "auto"]


def test_bad_dtype_is_a_one_line_error_naming_the_flag():
    with pytest.raises(ValueError) as err:
        normalize_dtype("fp8", "MODEL_DTYPE")
    assert str(err.value) == "MODEL_DTYPE='fp8' is not valid; allowed: fp32, bf16, fp16, auto"
    with pytest.raises(ValueError, match=r"^--dtype='half' is not valid; allowed: fp32, bf16, fp16, auto$"):
        normalize_dtype("half")


@pytest.mark.parametrize(
    "argv_head, prog",
    [
        (["eval", "gen", "--model", "m", "--benchmark", "b", "--out", "o"], "opd eval gen"),
        (["rollout", "--input", "i.parquet", "--model", "m", "--output", "o.jsonl"], "opd rollout"),
        (["sft", "--model", "m", "--data", "d.jsonl", "--output", "o"], "opd sft"),
    ],
)
def test_every_tool_refuses_a_bad_dtype_before_loading(argv_head, prog, tmp_path, monkeypatch, capsys):
    from opd.cli import main

    monkeypatch.chdir(tmp_path)
    assert main([*argv_head, "--dtype", "fp8"]) != 0
    err = capsys.readouterr().err.strip()
    assert err.startswith(prog) and err.endswith("--dtype='fp8' is not valid; allowed: fp32, bf16, fp16, auto")
    assert "\n" not in err and not (tmp_path / "o").exists()


def test_device_resolution(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: False)
    with pytest.raises(ValueError, match=r"^device 'cuda' \(--device / DEVICE\): this torch .* built without CUDA"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ValueError, match=r"^--gpu='cuda:2': no such CUDA device \(2 visible\)"):
        resolve_device("cuda:2", "--gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    with pytest.raises(
        ValueError, match=r"^--device='gpu' is not valid; expected auto \| cpu \| cuda \| cuda:N \| mps$"
    ):
        resolve_device("gpu")
    with pytest.raises(ValueError, match=r"^DEVICE='tpu' is not valid"):
        resolve_device("tpu", "DEVICE")


def _model(eos):
    return SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=eos))


def test_special_ids_tokenizer_first_then_generation_config(toy):
    tok = copy.deepcopy(toy["tok"])
    eos, pad = tok.eos_token_id, tok.pad_token_id
    assert eos != pad
    assert special_ids(tok, _model(None)) == ([eos], pad)
    assert special_ids(tok, _model(eos)) == ([eos], pad)
    # insertion order, not sorted: the tokenizer's EOS first, then the generation config's others, no repeats
    assert special_ids(tok, _model([7, eos, 3, 7])) == ([eos, 7, 3], pad)
    tok.pad_token = None
    assert special_ids(tok, _model([3])) == ([eos, 3], eos)  # pad falls back to the first EOS
    tok.eos_token = None
    assert special_ids(tok, _model([9, 3])) == ([9, 3], 9)
    with pytest.raises(ValueError, match="neither the tokenizer nor the generation config names an EOS token"):
        special_ids(tok, _model(None))


def test_load_policy_and_pair(toy):
    policy = load_policy(toy["model"], dtype="float32", device="cpu")
    assert policy.eos_ids == [toy["tok"].eos_token_id] and policy.pad_id == toy["tok"].pad_token_id
    assert policy.device == torch.device("cpu") and next(policy.model.parameters()).dtype is torch.float32
    assert not policy.model.training and not any(p.requires_grad for p in policy.model.parameters())
    assert load_policy(toy["model"], dtype="bf16", device="cpu", trainable=True).model.training
    with pytest.raises(OSError):  # a model id that is not in the cache is an error, never a download
        load_policy("opd-test/no-such-model", device="cpu")

    folders = open_pair(toy["model"], toy["model"], names=("--student", "--teacher"))
    assert folders.vocab_width is None and folders.teacher is not None
    pair = load_pair(folders, device=torch.device("cpu"), dtype="fp32", trainable=True, top_k=4, top_k_name="--k")
    assert pair.student.training and not pair.teacher.training and pair.eos_ids == policy.eos_ids
    with pytest.raises(ValueError, match=r"^--k=100000 exceeds the vocabulary"):
        load_pair(folders, device=torch.device("cpu"), dtype="fp32", trainable=False, top_k=100000, top_k_name="--k")
    alone = open_pair(toy["model"], None, names=("ACTOR_MODEL_PATH", "REWARD_MODEL_PATH"), with_teacher=False)
    assert alone.teacher is None
    with pytest.raises(ValueError, match="REWARD_MODEL_PATH is not set"):
        open_pair(toy["model"], None, names=("ACTOR_MODEL_PATH", "REWARD_MODEL_PATH"))


def test_transformers_sampler_is_opd_generation_sample(toy):
    """Seeds given: one generator per call seeded with the first; none: one stream from the sampler's own seed."""
    from opd.generation import render_prompt_ids, sample
    from opd.sampling import TransformersSampler

    policy = load_policy(toy["model"], device="cpu")
    tok = policy.tokenizer
    prompts = [render_prompt_ids(tok, [{"role": "user", "content": f"{i} + 1"}]) for i in range(3)]
    kw = dict(max_new_tokens=6, eos_token_ids=policy.eos_ids, pad_token_id=policy.pad_id, temperature=1.0, top_p=0.9)

    outs = TransformersSampler(policy).generate(prompts, max_tokens=6, temperature=1.0, top_p=0.9, seeds=[5, 6, 7])
    want = sample(policy.model, prompts, generator=torch.Generator().manual_seed(5), batch_size=3, **kw)
    assert [o.text for o in outs] == tok.batch_decode(want, skip_special_tokens=True)
    assert [o.n_tokens for o in outs] == [len(w) for w in want] and {o.seed for o in outs} == {5}
    assert [o.finish_reason for o in outs] == ["stop" if w[-1] in policy.eos_ids else "length" for w in want]

    stream = TransformersSampler(policy, seed=3, batch_size=2)
    got = [o.text for _ in range(2) for o in stream.generate(prompts, max_tokens=6, temperature=1.0, top_p=0.9)]
    gen = torch.Generator().manual_seed(3)
    want = [
        t
        for _ in range(2)
        for t in tok.batch_decode(
            sample(policy.model, prompts, generator=gen, batch_size=2, **kw), skip_special_tokens=True
        )
    ]
    assert got == want


def test_vllm_stays_optional():
    """Importing the samplers never imports vLLM; building one without it is a plain ImportError."""
    import importlib.util

    from opd.sampling import VLLMSampler

    if importlib.util.find_spec("vllm") is None:
        with pytest.raises(ImportError):
            VLLMSampler("m")
