"""Data tools for OPD: the RL parquet schema, prompt templates, prompt-set conversion, dedup, teacher rollouts
with rejection sampling, and the LlamaFactory export for the off-policy cold start (docs/workflow.md §1-§5).

Every tool works offline: inputs are local files (or an already-populated Hugging Face cache for models).
"""
