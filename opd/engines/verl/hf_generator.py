"""One prompt in, one sampled response out, with transformers `generate`: the engine inside the `opd_hf` rollout.

Plain torch + transformers (no verl, no Ray), so it is unit-tested on its own. The rules that keep the rollout's
log-probs equal to the ones verl's trainer recomputes:
- sampling uses exactly verl's parameters: top_k <= 0 means the full distribution (HF's own default top_k=50 would
  otherwise apply), and the checkpoint's generation_config.json (e.g. a chat model's top_k/top_p/repetition
  penalty) is dropped after its EOS ids are read;
- a response stops at (and keeps) the first EOS of the project's rule (`opd.models.special_ids`);
- log-probs are log-softmax of the processed scores (temperature, top-k, top-p applied), like vLLM's default
  ``processed_logprobs``; with top_k <= 0 and top_p = 1 that is the trainer's log_softmax(logits / temperature).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from opd.models import load_causal_lm, normalize_dtype, special_ids, torch_dtype


@dataclass(frozen=True)
class Sampling:
    """verl's per-request sampling parameters, normalised (temperature 0 = greedy)."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # <= 0: no top-k filter
    repetition_penalty: float = 1.0
    logprobs: bool = True
    ignore_eos: bool = False


# sampling_params keys verl's agent loop and clients send; any other key would be silently ignored, so it raises
_VERL_SAMPLING_KEYS = {
    "temperature",
    "top_p",
    "top_k",
    "repetition_penalty",
    "logprobs",
    "max_tokens",
    "max_new_tokens",
    "ignore_eos",
    "detokenize",
}


def _max_new_tokens(config, sampling_params: dict, prompt_len: int) -> int:
    """verl's budget: the request's max_tokens, else what is left of prompt+response length, within max_model_len."""
    max_len = config.max_model_len or config.prompt_length + config.response_length
    if max_len - prompt_len < 1:
        raise ValueError(f"a prompt of {prompt_len} tokens leaves no room to generate within {max_len} tokens")
    requested = sampling_params.get("max_tokens", sampling_params.get("max_new_tokens"))
    if requested is None:
        requested = min(config.response_length, config.prompt_length + config.response_length - prompt_len)
    return max(1, min(int(requested), max_len - prompt_len))


def sampling_from_verl(config, sampling_params: dict, prompt_len: int) -> Sampling:
    """verl's per-request sampling_params (with its RolloutConfig) as a `Sampling`; top_k -1/None/0 = no top-k."""
    unknown = sorted(set(sampling_params) - _VERL_SAMPLING_KEYS)
    if unknown:
        raise ValueError(f"the opd_hf rollout does not support sampling params {unknown}")
    top_k = sampling_params.get("top_k")
    return Sampling(
        max_new_tokens=_max_new_tokens(config, sampling_params, prompt_len),
        temperature=float(sampling_params.get("temperature", 1.0)),
        top_p=float(sampling_params.get("top_p") or 1.0),
        top_k=int(top_k) if top_k is not None and int(top_k) > 0 else 0,
        repetition_penalty=float(sampling_params.get("repetition_penalty") or 1.0),
        logprobs=bool(sampling_params.get("logprobs", False)),
        ignore_eos=bool(sampling_params.get("ignore_eos", config.ignore_eos)),
    )


class HFGenerator:
    """A frozen causal LM on the CPU that samples one response at a time and takes new weights by name."""

    def __init__(self, path: str, *, dtype: str = "fp32", random_init: bool = False, seed: int = 0):
        """`random_init` (verl's load_format "dummy"): build from the config; weights must then arrive by
        `load_weights` before the first `generate`, as verl syncs the actor's weights before its first rollout."""
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

        dtype = normalize_dtype(dtype, flag="rollout dtype")
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        if random_init:
            config = AutoConfig.from_pretrained(path, local_files_only=True)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                self.model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype(dtype, "cpu"))
            try:
                self.model.generation_config = GenerationConfig.from_pretrained(path, local_files_only=True)
            except OSError:
                pass  # no generation_config.json: the EOS rule falls back to the tokenizer's
            self.model.eval().requires_grad_(False)
        else:
            self.model = load_causal_lm(path, dtype=dtype, device="cpu", trainable=False)
        self.eos_ids, self.pad_id = special_ids(self.tokenizer, self.model)
        self.model.generation_config = GenerationConfig()  # only what `generate` is told below may apply
        self.has_weights = not random_init
        torch.manual_seed(seed)  # HF sampling draws from the global RNG; this process exists only for this model

    @torch.no_grad()
    def generate(self, prompt_ids: list[int], sampling: Sampling) -> tuple[list[int], list[float] | None, str]:
        """(response ids, their log-probs or None, "stop" | "length")."""
        from transformers import GenerationConfig

        if not self.has_weights:
            raise RuntimeError(
                "the rollout model was built with random weights (load_format=dummy) and has not "
                "received the actor's weights yet"
            )
        if not prompt_ids:
            raise ValueError("empty prompt (0 tokens) cannot be sampled from")
        greedy = sampling.temperature <= 0
        gen = dict(
            max_new_tokens=sampling.max_new_tokens,
            min_new_tokens=0,
            do_sample=not greedy,
            repetition_penalty=sampling.repetition_penalty,
            pad_token_id=self.pad_id,
            eos_token_id=None if sampling.ignore_eos else list(self.eos_ids),
            output_scores=sampling.logprobs,
            return_dict_in_generate=True,
        )
        if not greedy:
            gen.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=max(sampling.top_k, 0))
        input_ids = torch.tensor([prompt_ids], dtype=torch.long)
        out = self.model.generate(
            input_ids=input_ids, attention_mask=torch.ones_like(input_ids), generation_config=GenerationConfig(**gen)
        )
        tokens = out.sequences[0, len(prompt_ids) :].tolist()
        finish = "length"
        if not sampling.ignore_eos:
            for i, tok in enumerate(tokens):
                if tok in self.eos_ids:
                    tokens, finish = tokens[: i + 1], "stop"
                    break
        log_probs = None
        if sampling.logprobs:
            scores = torch.stack([s[0] for s in out.scores[: len(tokens)]]).float()  # [T, V] processed scores
            log_probs = scores.log_softmax(-1).gather(-1, torch.tensor(tokens)[:, None]).squeeze(-1).tolist()
        return tokens, log_probs, finish

    @torch.no_grad()
    def load_weights(self, named: dict[str, torch.Tensor]) -> int:
        """Copy tensors in by state-dict name; every parameter must be covered (a tied one through its twin).

        A partial update would leave the rollout sampling from a mix of old and new weights, so it raises instead.
        """
        own = self.model.state_dict()
        unexpected = sorted(set(named) - set(own))
        if unexpected:
            raise KeyError(f"{len(unexpected)} weights the rollout model does not have, e.g. {unexpected[:3]}")
        covered = {own[name].data_ptr() for name in named}
        missing = sorted(name for name, t in own.items() if name not in named and t.data_ptr() not in covered)
        if missing:
            raise KeyError(f"{len(missing)} rollout weights were not sent, e.g. {missing[:3]}")
        for name, tensor in named.items():
            own[name].copy_(tensor)
        self.has_weights = True
        return len(named)
