"""The rule reward in the shape of verl's custom reward function, so the verl plugin uses this same grader.

verl calls ``compute_score(data_source, solution_str, ground_truth, extra_info, **kwargs)`` per response: set
``reward.custom_reward_function.path=pkg://opd.grading.reward`` (the module, not its file path: loading the file
by path breaks its package-relative import) and ``.name=compute_score``. A dict result gives the reward under
"score" and logs the other keys. No verl import here: the function is plain Python.
"""

from __future__ import annotations

from .score import grade_response

__all__ = ["compute_score"]


def compute_score(
    data_source: str, solution_str: str, ground_truth: str, extra_info: dict | None = None, **kwargs
) -> dict:
    """{"score": 1.0/0.0, "acc": same, "format_ok": 1.0 if a final answer was found}. data_source and the extra
    keywords verl passes with a reward model or reward_kwargs configured are not used."""
    res = grade_response(solution_str, str(ground_truth))
    return {"score": res.score, "acc": res.score, "format_ok": float(res.extracted is not None)}
