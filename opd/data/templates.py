"""Instruction templates that wrap a raw math problem into a user prompt, and their inverse (stripping).

A template is plain text with exactly one `{problem}` placeholder. We substitute with str.replace, not
str.format, because math templates contain literal braces (`\\boxed{}`).
Stripping matters for dedup: two prompt sets that wrap the same problem in different templates must compare
equal, so `strip_template` removes any known template (and any user template passed in) from a prompt.
"""

from __future__ import annotations

import re
from pathlib import Path

PLACEHOLDER = "{problem}"

# The DAPO-Math-17k instruction (docs/workflow.md §1), as published.
DAPO = (
    "Solve the following math problem step by step. The last line of your response should be of the form "
    "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n"
    + PLACEHOLDER
    + '\n\nRemember to put your answer on its own line after "Answer:".'
)
BOXED = PLACEHOLDER + " Please reason step by step, and put your final answer within \\boxed{}."

TEMPLATES: dict[str, str] = {"dapo": DAPO, "boxed": BOXED, "none": PLACEHOLDER}

# Further wrappers seen in public math prompt sets; recognised when stripping, never applied.
_STRIP_ONLY = (
    PLACEHOLDER + " Let's think step by step and output the final answer within \\boxed{}.",
    PLACEHOLDER + "\nPlease reason step by step, and put your final answer within \\boxed{}.",
    "Return your final response within \\boxed{}. " + PLACEHOLDER,
)


def load_template(name_or_path: str) -> str:
    """A built-in template by name (dapo, boxed, none) or a text file holding one `{problem}` placeholder."""
    if name_or_path in TEMPLATES:
        return TEMPLATES[name_or_path]
    path = Path(name_or_path)
    if not path.is_file():
        raise ValueError(f"unknown template {name_or_path!r}: use one of {sorted(TEMPLATES)} or a path to a text file")
    text = path.read_text(encoding="utf-8")
    if text.endswith("\n") and not text.endswith("\n\n"):
        text = text[:-1]  # editors add a final newline; it is not part of the prompt
    check_template(text, source=str(path))
    return text


def check_template(template: str, source: str = "template") -> None:
    n = template.count(PLACEHOLDER)
    if n != 1:
        raise ValueError(f"{source}: a template needs exactly one {PLACEHOLDER} placeholder, found {n}")


def apply_template(template: str, problem: str) -> str:
    check_template(template)
    return template.replace(PLACEHOLDER, problem.strip())


def _split(template: str) -> tuple[str, str]:
    prefix, suffix = template.split(PLACEHOLDER)
    return _norm(prefix), _norm(suffix)


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def strip_template(text: str, extra_templates: tuple[str, ...] | list[str] = (), normalize: bool = True) -> str:
    """The raw problem inside a templated prompt.

    Tries every known template (plus `extra_templates`), longest wrapper first so "dapo" wins over a bare suffix.
    With normalize=True (dedup keys) the result has each whitespace run collapsed to one space; with
    normalize=False (prepare) the problem keeps its own line breaks when the wrapper matches exactly, and
    falls back to the normalised match otherwise. Text that matches no template is returned (stripped) as is.
    """
    candidates = [t for t in (*extra_templates, *TEMPLATES.values(), *_STRIP_ONLY) if t != PLACEHOLDER]
    if not normalize:
        raw = text.strip()
        for t in sorted(set(candidates), key=len, reverse=True):
            prefix, suffix = (part.strip() for part in t.split(PLACEHOLDER))
            if raw.startswith(prefix) and raw.endswith(suffix) and len(raw) > len(prefix) + len(suffix):
                return raw[len(prefix) : len(raw) - len(suffix)].strip()
    norm = _norm(text)
    pairs = sorted({_split(t) for t in candidates}, key=lambda ps: -len(ps[0]) - len(ps[1]))
    for prefix, suffix in pairs:
        if norm.startswith(prefix) and norm.endswith(suffix) and len(norm) > len(prefix) + len(suffix):
            return norm[len(prefix) : len(norm) - len(suffix)].strip()
    return norm if normalize else text.strip()
