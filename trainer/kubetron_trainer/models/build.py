"""Megatron-Core `GPTModel` chunks for a `TrainerConfig`, built on explicit process groups.

Every Megatron-Core object here takes the trainer's `ProcessGroupCollection`; nothing reads
`parallel_state`. The chunks are built from the translated config (`models/megatron_config.py`)
and the layer spec (`models/spec.py`) for the engine decided at start (`models/fast_path.py`).
With virtual pipeline stages a rank holds several model chunks; only the very first chunk
embeds and only the very last computes the loss.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.models.gpt import GPTModel
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.transformer_config import TransformerConfig

from kubetron_api.config import TrainerConfig
from kubetron_api.dims import ParallelDims
from kubetron_trainer.models.fast_path import EngineChoice
from kubetron_trainer.models.megatron_config import padded_vocab_size, transformer_config
from kubetron_trainer.models.spec import layer_spec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelChunks:
    """This rank's model chunks (one per virtual pipeline stage) and how they were built."""

    chunks: list[GPTModel]
    config: TransformerConfig
    attention: str  # the layer spec's attention path, for the log and the summary
    padded_vocab_size: int
    choice: EngineChoice


class CpuRotaryEmbedding(RotaryEmbedding):
    """Megatron's RoPE, minus the move of `inv_freq` to CUDA on the first forward."""

    def get_emb(self, max_seq_len: int, offset: int = 0) -> torch.Tensor:
        freqs = self.get_freqs_non_repeated(max_seq_len, offset)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb[:, None, None, :]


def build_model(
    cfg: TrainerConfig,
    dims: ParallelDims,
    pg: ProcessGroupCollection,
    device: torch.device,
    choice: EngineChoice,
) -> ModelChunks:
    """This rank's GPTModel chunks, on `device`, with pre/post-process from the pipeline rank.
    The degrees come from `dims`, this rank's place in them from `pg` (built from the same),
    the attention and the fast-path pieces from `choice` (`fast_path.decide_fast_path`)."""
    arch = cfg.model
    config = transformer_config(cfg, dims, device, choice.fast, choice.fp8)
    vocab = padded_vocab_size(arch.vocab_size, dims.tp)
    spec = layer_spec(arch, choice.attention, choice.fast, choice.fp8)
    pp_rank, pp_size, vpp = pg.pp.rank(), dims.pp, dims.vpp_size or 1
    chunks = []
    for stage in range(vpp):
        model = GPTModel(
            config=config,
            transformer_layer_spec=spec.decoder(config, pp_rank, stage if vpp > 1 else None),
            vocab_size=vocab,
            max_sequence_length=cfg.recipe.seq_length,
            pre_process=pp_rank == 0 and stage == 0,
            post_process=pp_rank == pp_size - 1 and stage == vpp - 1,
            share_embeddings_and_output_weights=not arch.untie_embeddings,
            position_embedding_type=arch.position_embedding_type,
            rotary_base=arch.rotary_base,
            rope_scaling=arch.rope_scaling_factor is not None,
            rope_scaling_factor=arch.rope_scaling_factor or 8.0,  # Megatron's default when unused
            pg_collection=pg,
            vp_stage=stage if vpp > 1 else None,
        )
        if device.type == "cpu" and arch.position_embedding_type == "rope":
            model.rotary_pos_emb.__class__ = CpuRotaryEmbedding
        chunks.append(model.to(device))
    log.info("attention path: %s (padded vocab %d)", spec.name, vocab)
    return ModelChunks(chunks, config, spec.name, vocab, choice)
