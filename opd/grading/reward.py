"""The rule reward in the shape of verl's custom reward function, so the verl plugin uses this same grader.

verl calls ``compute_score(data_source, solution_str, ground_truth, extra_info)`` per response (set
``custom_reward_function.path`` to this file and ``.name`` to ``compute_score``); a dict result gives the reward
under "score" and logs the other keys. No verl import here: the function is plain Python.
"""

from __future__ import annotations

from .score import grade_response

__all__ = ["compute_score"]


def compute_score(data_source: str, solution_str: str, ground_truth: str, extra_info: dict | None = None) -> dict:
    """{"score": 1.0/0.0, "acc": same, "format_ok": 1.0 if a final answer was found}; data_source is not used."""
    res = grade_response(solution_str, str(ground_truth))
    return {"score": res.score, "acc": res.score, "format_ok": float(res.extracted is not None)}
