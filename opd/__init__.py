"""OPD: on-policy distillation of LLMs.

`opd.core` is the algorithm (pure tensor code, no engine imports); `opd.engines` move tensors in and out of it.
"""

__version__ = "0.1.0"
