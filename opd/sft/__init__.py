"""Built-in SFT for the off-policy cold start (assistant-token masking, plain PyTorch); `opd sft` is its CLI."""

from opd.sft.trainer import Encoded, SFTConfig, encode_conversation, encode_dataset, train_sft

__all__ = ["Encoded", "SFTConfig", "encode_conversation", "encode_dataset", "train_sft"]
