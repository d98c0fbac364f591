"""Core attention on `torch.nn.functional.scaled_dot_product_attention` for the local spec.

Without Transformer Engine, Megatron-Core's local spec uses `DotProductAttention`, which
materialises the full `[b, heads, s, s]` score matrix (the Qwen3-1.7B shape at seq 4096 runs out
of memory on an H100), reads Megatron's global memory buffer and forks the CUDA RNG tracker for
dropout (so it cannot run on CPU). This module is a drop-in `core_attention` for the local spec
that hands the work to torch's SDPA kernels (flash / memory-efficient on GPU, math on CPU):
causal masking and grouped-query attention are done by SDPA itself. An `attention_mask`
(packed conversations, `data.type: chat`; Megatron's convention, True = masked) replaces the
causal mask; SDPA then runs its memory-efficient or math kernel (flash takes no mask).

Fast-path options (`models/fused.py`): `backend="cudnn"` asks SDPA for cuDNN attention first
(flash as the fallback; grouped-query attention inside the kernel), and `rope=True`
applies RoPE here in one fused kernel, with the frequencies `RopeSelfAttention` handed over.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig


class SdpaAttention(MegatronModule):
    """Causal self-attention over one tensor-parallel shard of heads, computed by torch SDPA.

    Takes Megatron's layout (`[s, b, heads, head_dim]`) and returns `[s, b, heads*head_dim]`,
    like `DotProductAttention`, so `SelfAttention` needs no change.
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection: ProcessGroupCollection | None = None,
        backend: str = "default",
        rope: bool = False,
    ) -> None:
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError(
                "SdpaAttention does not support context parallelism; set "
                "spec.parallelism.context to 1 or use an image with Transformer Engine"
            )
        if pg_collection is None:
            raise ValueError("SdpaAttention needs the model's pg_collection (its tp group)")
        if attn_mask_type not in (AttnMaskType.causal, AttnMaskType.no_mask):
            raise ValueError(f"SdpaAttention supports causal attention only, got {attn_mask_type}")
        self.tp_group = pg_collection.tp  # MegatronModule.sharded_state_dict reads it
        tp = pg_collection.tp.size()
        self.heads = config.num_attention_heads // tp
        self.groups = config.num_query_groups // tp
        self.head_dim = config.kv_channels
        self.causal = attn_mask_type == AttnMaskType.causal
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        self.scale = softmax_scale or 1.0 / math.sqrt(self.head_dim)
        if backend not in ("default", "cudnn"):
            raise ValueError(f"SdpaAttention backend must be default or cudnn, got {backend}")
        self.backend = backend
        self.rope = rope
        self.pending_rope: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params: PackedSeqParams | None = None,
    ) -> torch.Tensor:
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("SdpaAttention supports neither packed sequences nor attention bias")
        if self.rope and self.pending_rope is not None:
            from kubetron_trainer.models.rope import apply_rope, cos_sin

            q_freqs, k_freqs = self.pending_rope
            cos, sin = cos_sin(q_freqs, query.shape[0])
            query = apply_rope(query, cos, sin)
            if k_freqs is not q_freqs:
                cos, sin = cos_sin(k_freqs, key.shape[0])
            key = apply_rope(key, cos, sin)
        # [s, b, n, d] -> [b, n, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        if attention_mask is not None:  # packed conversations: the mask is causal already
            out = self._sdpa(q, k, v, gqa=self.groups != self.heads, mask=~attention_mask)
        elif self.backend == "cudnn" and q.is_cuda:
            out = self._cudnn(q, k, v)
        else:
            out = self._sdpa(q, k, v, gqa=self.groups != self.heads)
        # [b, n, s, d] -> [s, b, n*d]
        s, b = out.shape[2], out.shape[0]
        return out.permute(2, 0, 1, 3).reshape(s, b, self.heads * self.head_dim)

    def _sdpa(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        gqa: bool,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """SDPA, causal, or under `mask` (`[b, 1, s, s]`, True = attend) when given."""
        return F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=self.causal and mask is None,
            dropout_p=self.dropout if self.training else 0.0,
            scale=self.scale,
            enable_gqa=gqa,
        )

    def _cudnn(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        # cuDNN's kernel does grouped-query attention itself (torch >= 2.5 passes enable_gqa
        # through): no expanded copies of K/V, no reduction of their gradients.
        order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION]
        with sdpa_kernel(order, set_priority=True):
            return self._sdpa(q, k, v, gqa=self.groups != self.heads)
