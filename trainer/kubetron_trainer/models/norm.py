"""The local spec's norms: torch's RMSNorm/LayerNorm math that also runs sequence-parallel.

Megatron-Core's local spec (no Transformer Engine) builds its norms with `WrappedTorchNorm`,
which refuses `sequence_parallel`. Under sequence parallelism the norms see only this rank's
slice of the sequence, so their weight gradients are partial sums; Megatron's
`finalize_model_grads` all-reduces over the tensor-parallel group every gradient whose parameter
carries `sequence_parallel = True` (TE's norms set it). `Norm` is that: the same parameters,
state-dict keys and math as `torch.nn.RMSNorm` / `torch.nn.LayerNorm`, its parameters marked
with `config.sequence_parallel`. With `fused=True` (the fast path's `norm` piece) the RMSNorm
runs in kubetron's Triton kernels (`models/kernels.py`) instead.

`use_norm` puts it into every norm slot of a local layer spec; `spec.py` also makes it the
decoder's final norm (Megatron's default there is `WrappedTorchNorm` too).
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_config import TransformerConfig


class Norm(torch.nn.Module):
    """RMSNorm or LayerNorm (`config.normalization`), a drop-in for `WrappedTorchNorm`.

    `weight` (ones) and, for LayerNorm, `bias` (zeros), as torch's modules have them.
    `fused=True`: the Triton RMSNorm of `models/kernels.py` (inverse RMS in fp32, the
    normalised input rounded to its dtype before the weight scales it), imported only then.
    """

    def __init__(
        self,
        config: TransformerConfig,
        hidden_size: int,
        eps: float = 1e-5,
        fused: bool = False,
        **_: Any,
    ) -> None:
        super().__init__()
        if config.normalization not in ("RMSNorm", "LayerNorm"):
            raise ValueError(f"Norm supports RMSNorm and LayerNorm, not {config.normalization}")
        self.rms = config.normalization == "RMSNorm"
        if fused and not self.rms:
            raise ValueError("the fused norm is an RMSNorm; the model asks for LayerNorm")
        self.shape = (hidden_size,)
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size))
        self.bias = None if self.rms else torch.nn.Parameter(torch.zeros(hidden_size))
        for param in self.parameters():
            # read by finalize_model_grads: all-reduce this gradient over the tp group
            param.sequence_parallel = config.sequence_parallel  # type: ignore[attr-defined]
        self._fused: Any = None
        if fused:
            from kubetron_trainer.models.kernels import rms_norm

            self._fused = rms_norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._fused is not None:
            return self._fused(x, self.weight, self.eps)
        if self.rms:
            return F.rms_norm(x, self.shape, self.weight, self.eps)
        return F.layer_norm(x, self.shape, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        kind = "RMSNorm" if self.rms else "LayerNorm"
        return f"{kind}{self.shape}, eps={self.eps}{', fused' if self._fused else ''}"


def norm_builder(fused: bool = False) -> Any:
    """What a spec's norm slot takes: `Norm`, or `Norm` with the Triton kernel."""
    return partial(Norm, fused=True) if fused else Norm


def use_norm(spec: ModuleSpec, fused: bool = False) -> Any:
    """Put `Norm` into each norm slot of a local layer spec that holds a norm (input, pre-MLP,
    q/k); `IdentityOp` slots (no q/k norm in the model) stay. Returns the builder used."""
    from megatron.core.transformer.identity_op import IdentityOp

    norm = norm_builder(fused)
    layer = spec.submodules
    attention = layer.self_attention.submodules
    for owner, slot in [
        (layer, "input_layernorm"),
        (layer, "pre_mlp_layernorm"),
        (attention, "q_layernorm"),
        (attention, "k_layernorm"),
    ]:
        if getattr(owner, slot) not in (None, IdentityOp):
            setattr(owner, slot, norm)
    return norm
