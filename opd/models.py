"""Loading models and tokenizers with one set of rules for every tool: dtype names, device, EOS and pad ids.

Why one module: training, `opd check`, `opd eval gen`, `opd rollout`, `opd sft`, the verifier and the toy evaluator
must agree on which token stops a response and which one pads, or the same model gives different samples from tool
to tool. Nothing is downloaded: models are local folders or ids already in the Hugging Face cache.

The teacher scores the student's exact token ids and both models' top-k ids index each other's logits, so the
vocabularies must match token for token. The check reads only the tokenizers and configs (cheap), so a mismatch is
reported before any weights are loaded. Embedding matrices may be padded past the tokenizer (e.g. Qwen models of
different sizes pad to 151,936 or 152,064 rows): the engine then reads both models' logits over the common width,
which holds every real token.

Model paths are checked here before anything loads (`model_source`, `require_model_dir`, `tokenizer_source`), so
a missing path, a folder that is not a model or a training checkpoint folder gives one line naming the path rather
than transformers' hub or tokenizer errors. A checkpoint folder (`model/` beside the optimiser state) is read from
its `model/` automatically where a model is only read (eval, rollout, sft, grading).

torch is imported inside the functions, so configuration and argument parsing can use the vocabularies cheaply.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

# auto: bf16 on a CUDA device, fp32 elsewhere (vLLM: its own "auto", the model config's dtype)
DTYPES = ("fp32", "bf16", "fp16", "auto")
_DTYPE_ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
_VLLM_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "auto": "auto"}
DEVICES = "auto | cpu | cuda | cuda:N | mps"
_DEVICE_RE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def normalize_dtype(name: str, flag: str = "--dtype") -> str:
    """The canonical name (fp32, bf16, fp16, auto) of a dtype; the long torch spellings are accepted as aliases."""
    canonical = _DTYPE_ALIASES.get(name, name)
    if canonical not in DTYPES:
        raise ValueError(f"{flag}={name!r} is not valid; allowed: {', '.join(DTYPES)}")
    return canonical


def torch_dtype(name: str, device):
    """The torch dtype of `name` on `device` (auto: bf16 on CUDA, fp32 elsewhere)."""
    import torch

    name = normalize_dtype(name)
    if name == "auto":
        name = "bf16" if torch.device(device).type == "cuda" else "fp32"
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def vllm_dtype(name: str) -> str:
    """vLLM's spelling of a dtype name."""
    return _VLLM_DTYPES[normalize_dtype(name)]


def resolve_device(name: str, flag: str = "--device"):
    """A torch.device; auto = cuda when available, else cpu. A device this machine lacks is refused here, in one line,
    before anything loads (torch itself would only fail at the first `.to(device)`)."""
    import torch

    if not isinstance(name, str) or not _DEVICE_RE.fullmatch(name):
        raise ValueError(f"{flag}={name!r} is not valid; expected {DEVICES}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    # the training engine passes no flag: name both spellings (a tool's --device, the launchers' DEVICE)
    who = f"device {name!r} (--device / DEVICE)" if flag == "--device" else f"{flag}={name!r}"
    if device.type == "cuda" and not torch.backends.cuda.is_built():
        raise ValueError(f"{who}: this torch ({torch.__version__}) is built without CUDA; use cpu or auto")
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise ValueError(f"{who}: no such CUDA device ({torch.cuda.device_count()} visible); use cpu or auto")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{who}: MPS is not available on this machine; use cpu or auto")
    return device


class VocabularyMismatchError(ValueError):
    pass


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_NO_DOWNLOAD = "nothing is downloaded; `opd demo` builds toy models"


def _folder_problem(folder: Path, *, needs_config: bool = True) -> str | None:
    """Why `folder` cannot be loaded as a model (None: it looks like one). Reads only small JSON files."""
    if needs_config:
        try:
            config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            return f"config.json is not valid JSON ({exc})"
        if not isinstance(config, dict) or not config.get("model_type"):
            return "config.json names no model_type, so it is not a Hugging Face model config"
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        return f"no tokenizer files ({' / '.join(TOKENIZER_FILES)})"
    return None


def _checkpoint_model(folder: Path) -> Path | None:
    """`folder/model` when `folder` is a training checkpoint (the model one level down), else None."""
    inner = folder / "model"
    return inner if not (folder / "config.json").is_file() and (inner / "config.json").is_file() else None


def _in_hf_cache(model_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(model_id, "config.json"), str)
    except Exception:  # an id the hub library rejects is simply not cached
        return False


def model_source(path: str, flag: str = "--model", *, tokenizer_only: bool = False) -> str:
    """What to pass to from_pretrained for the tool option `flag`: a local model folder (a checkpoint folder's
    `model/`), or a model id already in the Hugging Face cache. Anything else is one error naming the path."""
    folder = Path(path)
    if folder.is_dir():
        folder = _checkpoint_model(folder) or folder
        if not tokenizer_only and not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{flag} {path}: not a model folder (no config.json; {_NO_DOWNLOAD})")
        problem = _folder_problem(folder, needs_config=not tokenizer_only)
        if problem:
            raise ValueError(f"{flag} {folder}: {problem}")
        return str(folder)
    if folder.exists():
        raise ValueError(f"{flag} {path}: is a file; expected a model folder")
    if _HUB_ID.fullmatch(str(path)) and _in_hf_cache(str(path)):
        return str(path)
    raise FileNotFoundError(f"{flag} {path}: no such folder, nor a model id in the Hugging Face cache ({_NO_DOWNLOAD})")


def tokenizer_source(path: str, flag: str = "--tokenizer") -> str:
    """`model_source` for a tokenizer: a tokenizer folder needs no config.json."""
    return model_source(path, flag, tokenizer_only=True)


def load_tokenizer(path: str, flag: str = "--tokenizer"):
    """The tokenizer of a model, tokenizer or checkpoint folder (never downloaded)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_source(path, flag), local_files_only=True)


def require_model_dir(path: str | None, variable: str, role: str) -> Path:
    if not path:
        raise ValueError(
            f"{variable} is not set: the local engine needs the {role} as a local Hugging Face model folder. "
            f"For a toy world that needs no download, run `opd demo` (it builds a teacher and a student), "
            f"then point {variable} at the folder it prints"
        )
    folder = Path(path)
    if not (folder / "config.json").is_file():
        # a training checkpoint keeps the model one level down, beside the optimiser and RNG states
        hint = f"; {folder / 'model'} is one" if (folder / "model" / "config.json").is_file() else ""
        raise FileNotFoundError(
            f"{variable}={path}: expected a local Hugging Face model folder with a config.json{hint} (nothing is "
            f"downloaded; `opd demo` builds toy models)"
        )
    problem = _folder_problem(folder)
    if problem:
        raise ValueError(f"{variable}={path}: {problem}")
    return folder


def check_vocabularies(student_path: Path, teacher_path: Path | None):
    """Load the student tokenizer; with a teacher, fail unless both vocabularies map every token to the same id.

    Returns (tokenizer, vocab_width): the logit width both models are read at (None: use the full width).
    """
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(student_path)
    if teacher_path is None:
        return tokenizer, None
    teacher_tok = AutoTokenizer.from_pretrained(teacher_path)
    s_vocab, t_vocab = tokenizer.get_vocab(), teacher_tok.get_vocab()
    if s_vocab != t_vocab:
        only_s = sorted(set(s_vocab) - set(t_vocab))
        only_t = sorted(set(t_vocab) - set(s_vocab))
        moved = sorted(tok for tok in set(s_vocab) & set(t_vocab) if s_vocab[tok] != t_vocab[tok])
        raise VocabularyMismatchError(
            f"student ({student_path}, {len(s_vocab)} tokens) and teacher ({teacher_path}, {len(t_vocab)} tokens) "
            f"do not share a vocabulary: {len(only_s)} tokens only in the student (e.g. {only_s[:3]}), "
            f"{len(only_t)} only in the teacher (e.g. {only_t[:3]}), {len(moved)} with different ids "
            f"(e.g. {moved[:3]}). OPD scores the student's token ids with the teacher, so both must use one tokenizer"
        )
    s_width = AutoConfig.from_pretrained(student_path).vocab_size
    t_width = AutoConfig.from_pretrained(teacher_path).vocab_size
    if s_width > t_width:
        # the student samples over its whole output layer: an id past the teacher's rows cannot be scored
        raise VocabularyMismatchError(
            f"the student's output layer ({student_path}: vocab_size {s_width}) is wider than the teacher's "
            f"({teacher_path}: vocab_size {t_width}): the student can sample ids {t_width}..{s_width - 1}, which the "
            f"teacher cannot score. Use a teacher at least as wide (a wider teacher is read at the student's width)"
        )
    width = min(s_width, t_width)
    if len(s_vocab) > width:
        raise VocabularyMismatchError(
            f"the tokenizer has {len(s_vocab)} tokens but a model's output layer has only {width} rows "
            f"(student {s_width}, teacher {t_width})"
        )
    return tokenizer, (None if s_width == t_width else width)


def load_causal_lm(path, *, dtype: str, device, trainable: bool):
    """A causal LM on `device`; frozen models get requires_grad False and eval mode. Never downloads."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(dtype, device), local_files_only=True)
    model = model.to(device)
    model.train(trainable)
    if not trainable:
        model.requires_grad_(False)
    return model


def special_ids(tokenizer, model) -> tuple[list[int], int]:
    """(EOS ids, pad id): the tokenizer's EOS, then the generation config's others; pad falls back to the first EOS."""
    eos: list[int] = []
    if tokenizer.eos_token_id is not None:
        eos.append(int(tokenizer.eos_token_id))
    gen_eos = getattr(model.generation_config, "eos_token_id", None)
    for tok in [gen_eos] if isinstance(gen_eos, int) else list(gen_eos or []):
        if int(tok) not in eos:
            eos.append(int(tok))
    if not eos:
        name = getattr(tokenizer, "name_or_path", None) or "the model"
        raise ValueError(
            f"{name}: neither the tokenizer nor the generation config names an EOS token: sampling could not stop"
        )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    return eos, int(pad)


@dataclass
class Policy:
    """A model ready to sample from, with its tokenizer and the ids that stop and pad its responses."""

    model: object
    tokenizer: object
    eos_ids: list[int]
    pad_id: int
    device: object


def load_policy(path, *, dtype: str = "auto", device="auto", trainable: bool = False) -> Policy:
    """Tokenizer, then model, from a local folder or the Hugging Face cache (never downloaded)."""
    from transformers import AutoTokenizer

    device = resolve_device(device) if isinstance(device, str) else device
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = load_causal_lm(path, dtype=dtype, device=device, trainable=trainable)
    eos_ids, pad_id = special_ids(tokenizer, model)
    return Policy(model, tokenizer, eos_ids, pad_id, device)


@dataclass(frozen=True)
class PairFolders:
    """A student folder and an optional teacher folder that share one vocabulary; no weights are loaded yet."""

    student: Path
    teacher: Path | None
    tokenizer: object
    vocab_width: int | None  # the logit width both models are read at (None: the full width)


def open_pair(
    student: str | None, teacher: str | None, *, names: tuple[str, str], with_teacher: bool = True
) -> PairFolders:
    """Check the folders and the vocabularies first, so a mismatch fails before any data or weights are read.

    `names`: how the caller's user spells the two paths (e.g. ("--student", "--teacher")), for the errors.
    """
    student_dir = require_model_dir(student, names[0], "student")
    teacher_dir = require_model_dir(teacher, names[1], "teacher") if with_teacher else None
    tokenizer, vocab_width = check_vocabularies(student_dir, teacher_dir)
    return PairFolders(student_dir, teacher_dir, tokenizer, vocab_width)


@dataclass
class Pair:
    student: object
    teacher: object | None
    eos_ids: list[int]
    pad_id: int


def load_pair(
    folders: PairFolders,
    *,
    device,
    dtype: str,
    teacher_dtype: str | None = None,
    trainable: bool,
    top_k: int,
    top_k_name: str,
) -> Pair:
    """The student, then the frozen teacher, on `device`; fails when `top_k` exceeds the width both are read at."""
    student = load_causal_lm(folders.student, dtype=dtype, device=device, trainable=trainable)
    teacher = None
    if folders.teacher is not None:
        teacher = load_causal_lm(folders.teacher, dtype=teacher_dtype or dtype, device=device, trainable=False)
    width = folders.vocab_width or student.get_output_embeddings().weight.shape[0]
    if top_k > width:
        raise ValueError(f"{top_k_name}={top_k} exceeds the vocabulary ({width} tokens)")
    eos_ids, pad_id = special_ids(folders.tokenizer, student)
    return Pair(student, teacher, eos_ids, pad_id)
