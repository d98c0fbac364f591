"""Which engine runs the layers, and which fast-path pieces apply: decided once, here.

`recipe.fastPath` (or `--fast-path`) asks for pieces (`models/fused.py` says what each one is).
Whether a piece runs depends on the device, the attention backend (and so on whether the image
has Transformer Engine), the data, the model, the parallel shape and this torch.
`decide_fast_path` weighs all of it once, at start and before the trainer joins the job: it
refuses what cannot run, logs why a requested piece is not applied, and returns the
`EngineChoice` that the layer spec, Megatron's config, the GPU step and the engine report read.
`recipe.precision: fp8` with the fast path on is decided here too: kubetron's own fp8 GEMMs
(`models/fp8.py`) where the device, model and shape allow them, else a refusal naming why.
The spec rule that refuses a listed `ce` under tensor parallelism (`rules.py`) reads the same
parsed `FastPath`. Torch is not imported here.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from kubetron_api.config import FastPath, ModelArch, Precision, RecipeSpec, TrainerConfig
from kubetron_api.dims import ParallelConfigError, ParallelDims
from kubetron_api.exitcodes import ConfigError
from kubetron_api.rules import missing_transformer_engine, transformer_engine_uses
from kubetron_api.wire import FP8_PIECE, LayerEngine

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

AttentionBackend = Literal["auto", "te", "sdpa", "unfused"]
Attention = Literal["te", "sdpa", "unfused"]  # what runs: `auto` resolved
OFF = FastPath()


def te_available() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


@dataclass(frozen=True)
class EngineChoice:
    """The core attention that runs, the fast-path pieces that apply (OFF: none) and whether
    the linear layers run kubetron's fp8 GEMMs (`models/fp8.py`; TE's fp8 is `attention` te)."""

    attention: Attention
    fast: FastPath = OFF
    fp8: bool = False

    @property
    def engine(self) -> LayerEngine:
        """What runs the layers, for the log, the metrics and status.progress.engine."""
        if self.attention == "te":
            return LayerEngine("transformer-engine")
        if self.fast.enabled or self.fp8:
            return LayerEngine("fast-path", self.fast.pieces + ((FP8_PIECE,) if self.fp8 else ()))
        return LayerEngine("local")


def decide_fast_path(
    fast: FastPath,
    cfg: TrainerConfig,
    dims: ParallelDims,
    device: torch.device,
    attention: AttentionBackend = "auto",
) -> EngineChoice:
    """The engine for this config, shape and device, `attention` as the command line asks.

    Raises `ConfigError` for Transformer Engine with packed conversations and for fp8 where
    kubetron's fp8 GEMMs cannot run, and `ParallelConfigError` for a recipe that needs
    Transformer Engine where it does not run."""
    attention = attention_for_data(attention, cfg)
    runs = resolve_backend(pick_attention(attention, device.type, fast, cfg))
    # fp8 and context parallelism need TE's layer spec, which only an image with TE has
    if runs != "te" and (problems := missing_transformer_engine(cfg.recipe, cfg.parallelism)):
        raise ParallelConfigError(problems, f"device {device.type}, world={cfg.world_size}")
    fp8 = runs != "te" and cfg.recipe.precision == Precision.FP8
    if fp8 and (why_not := fp8_refusal(cfg, dims, device, runs)):
        raise ConfigError("spec.recipe.precision", f"fp8 on the fast path: {why_not}")
    if not fast.enabled:
        return EngineChoice(runs)
    if device.type != "cuda":  # a no-op on the CPU (the default is on)
        log.info("%s: not applied on %s", fast.describe(), device.type)
        return EngineChoice(runs)
    if runs != "sdpa":
        log.warning("%s requested; not applied (%s, %s)", fast.describe(), device.type, runs)
        return EngineChoice(runs)
    fast = pieces_for_model(fast, cfg.model, dims)
    if fast.wgrad:
        from kubetron_trainer.models.fused import enable_wgrad_fusion

        if why_not := enable_wgrad_fusion(device):
            log.warning("fast path: wgrad not applied: %s", why_not)
            fast = fast.without("wgrad")
    return EngineChoice(runs, fast, fp8)


def fp8_refusal(
    cfg: TrainerConfig, dims: ParallelDims, device: torch.device, runs: Attention
) -> str | None:
    """Why kubetron's fp8 GEMMs cannot run this model, shape and device, or None."""
    if runs != "sdpa":
        return f"they replace the fast path's linear layers, and {runs} attention runs no fast path"
    if why_not := fp8_model_refusal(cfg.model, cfg.recipe, dims):
        return why_not
    from kubetron_trainer.models.fp8 import fp8_device_refusal

    return fp8_device_refusal(device)


FP8_DIM_MULTIPLE = 16  # torch._scaled_mm wants every GEMM dimension a multiple of 16


def fp8_model_refusal(arch: ModelArch, recipe: RecipeSpec, dims: ParallelDims) -> str | None:
    """Why the linear layers of this model and shape cannot take fp8 GEMMs, or None: MoE
    experts, or a GEMM dimension (per tensor-parallel rank) that is not a multiple of 16."""
    if arch.is_moe:
        return (
            "kubetron's fp8 GEMMs cover dense models, not MoE experts; use fastPath off with "
            "Transformer Engine's fp8"
        )
    q = arch.kv_channels * arch.num_attention_heads
    kv = arch.kv_channels * arch.num_query_groups
    fc1 = arch.ffn_hidden_size * (2 if arch.swiglu else 1)
    sizes = {
        "hidden size": arch.hidden_size,
        "qkv outputs per rank": (q + 2 * kv) // dims.tp,
        "attention projection inputs per rank": q // dims.tp,
        "fc1 outputs per rank": fc1 // dims.tp,
        "fc2 inputs per rank": arch.ffn_hidden_size // dims.tp,
        "tokens per micro-batch (seqLength x microBatchSize)": (
            recipe.seq_length * recipe.micro_batch_size
        ),
    }
    odd = [f"{name} {size}" for name, size in sizes.items() if size % FP8_DIM_MULTIPLE]
    if odd:
        return (
            f"torch._scaled_mm needs GEMM dimensions that are multiples of {FP8_DIM_MULTIPLE}: "
            + ", ".join(odd)
        )
    return None


def attention_for_data(attention: AttentionBackend, cfg: TrainerConfig) -> AttentionBackend:
    """Packed conversations (data.type chat) carry a block-diagonal mask that TE's spec
    ignores: `auto` means sdpa for them, and `te` is refused."""
    if cfg.data.type != "chat":
        return attention
    if attention == "te":
        raise ConfigError(
            "--attention",
            "te ignores the attention mask of packed conversations (data.type chat); use "
            "sdpa (what auto picks for chat data)",
        )
    return "sdpa" if attention == "auto" else attention


def pick_attention(
    attention: AttentionBackend, device_type: str, fast_path: FastPath, cfg: TrainerConfig
) -> AttentionBackend:
    """On GPUs the TE-free fast path (recipe.fastPath, on by default) replaces `auto`'s
    Transformer Engine, unless the recipe needs TE (context parallelism; fp8 with the fast path
    off); `fastPath: off`
    or `--attention te` asks for TE, except with LoRA (`recipe.peft`), whose adapters wrap the
    local spec's linear layers. Elsewhere `attention` as given."""
    needs_te = bool(transformer_engine_uses(cfg.recipe, cfg.parallelism))
    if attention == "auto" and device_type == "cuda" and fast_path.enabled and not needs_te:
        return "sdpa"
    if attention == "auto" and cfg.recipe.peft is not None:  # LoRA adapts the local spec only
        return "sdpa"
    return attention


def resolve_backend(backend: AttentionBackend) -> Attention:
    """`auto`: Transformer Engine when the image has it, else torch SDPA."""
    if backend == "auto":
        return "te" if te_available() else "sdpa"
    return backend


def pieces_for_model(fast: FastPath, arch: ModelArch, dims: ParallelDims) -> FastPath:
    """The pieces that apply to this model and shape; each one dropped is logged."""
    if fast.rope and arch.position_embedding_type != "rope":
        fast = fast.without("rope")
    if fast.swiglu and (not arch.swiglu or arch.is_moe):
        # the experts' MLPs would need the module too; a GELU model has no SwiGLU to replace
        log.info("fast path: swiglu applies to dense SwiGLU models; not applied")
        fast = fast.without("swiglu")
    if fast.ce and dims.tp_enabled:  # a listed ce was refused by the spec's rules already
        log.warning("fast path: ce needs tensor parallel size 1; ce not applied")
        fast = fast.without("ce")
    if fast.wgrad and not (fast.ce or arch.untie_embeddings):
        log.warning("fast path: wgrad needs ce (or untied embeddings); wgrad not applied")
        fast = fast.without("wgrad")
    return fast
