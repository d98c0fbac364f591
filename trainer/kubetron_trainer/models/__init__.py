"""GPT models for the trainer: Megatron-Core `GPTModel` chunks built on explicit process groups."""

from kubetron_trainer.models.attention import SdpaAttention
from kubetron_trainer.models.build import ModelChunks, build_model, padded_vocab_size, te_available

__all__ = ["ModelChunks", "SdpaAttention", "build_model", "padded_vocab_size", "te_available"]
