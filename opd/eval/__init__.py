"""Evaluation after training: `opd eval gen` samples N answers per benchmark problem, `opd eval grade` grades them.

Modules: `benchmarks` (benchmark names/paths -> problems), `gen` (generation, vLLM or transformers, resumable
JSONL), `grade` (rule grading + metrics -> grading_results.json), `metrics` (pure metric functions),
`verifier` (optional verifier LLM for rule failures). The grader itself lives in `opd.grading`, shared with the
engines' rule reward.
"""
