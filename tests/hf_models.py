"""Tiny random Hugging Face models (transformers, CPU) and kubetron's view of them.

`python -m tests.hf_models DIR KIND VOCAB TP OUT` is one rank of a parity check (torchrun's
variables in the environment, or none for a world of one): it builds kubetron's GPTModel for
`KIND` in tensor-parallel degree TP (data-parallel over the rest of the world), loads the
Hugging Face checkpoint in DIR through `kubetron_trainer.hf`, and rank 0 writes to OUT the
largest difference between the gathered logits and the transformers model's on the same tokens.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

from kubetron_api.config import ModelArch, ModelSpec

# kind -> (preset, what the tiny model keeps of it: its own numbers are in OVERRIDES)
PRESET = {"qwen3": "qwen3-0.6b", "llama": "llama3-8b"}
OVERRIDES: dict[str, Any] = {
    "numLayers": 2, "hiddenSize": 64, "ffnHiddenSize": 128, "numAttentionHeads": 4,
    "numQueryGroups": 2, "kvChannels": 16, "maxPositionEmbeddings": 512,
}  # fmt: skip
TOKENS = (2, 24)  # batch, sequence of the parity check


def model_spec(kind: str, vocab: int) -> ModelSpec:
    return ModelSpec.model_validate(
        {"preset": PRESET[kind], "overrides": {**OVERRIDES, "vocabSize": vocab}}
    )


def hf_model(kind: str, arch: ModelArch, seed: int = 0) -> Any:
    """A transformers model of `arch`, with every weight (norms too) drawn N(0, 0.2)."""
    import transformers

    common = {
        "vocab_size": arch.vocab_size, "hidden_size": arch.hidden_size,
        "intermediate_size": arch.ffn_hidden_size, "num_hidden_layers": arch.num_layers,
        "num_attention_heads": arch.num_attention_heads,
        "num_key_value_heads": arch.num_query_groups, "head_dim": arch.kv_channels,
        "max_position_embeddings": arch.max_position_embeddings,
        "rope_theta": float(arch.rotary_base), "rms_norm_eps": arch.norm_epsilon,
        "tie_word_embeddings": not arch.untie_embeddings,
    }  # fmt: skip
    torch.manual_seed(seed)
    if kind == "qwen3":
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**common))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model.eval()


def save_hf_model(kind: str, vocab: int, directory: Path, seed: int = 0) -> Any:
    model = hf_model(kind, model_spec(kind, vocab).resolve(), seed)
    model.save_pretrained(directory)
    return model


def rank_env(rank: int, world: int, port: int) -> dict[str, str]:
    """torchrun's variables for rank `rank` of a one-host world, and the project on the path."""
    root = Path(__file__).resolve().parents[1]
    return dict(os.environ) | {
        "PYTHONPATH": os.pathsep.join(str(root / d) for d in ("trainer", "api", "operator", ".")),
        "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
        "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
        "LOCAL_WORLD_SIZE": str(world), "GROUP_RANK": "0",
    }  # fmt: skip


def run_parity(directory: Path, kind: str, vocab: int, tp: int, world: int) -> dict[str, Any]:
    """`world` ranks of the parity check (subprocesses); rank 0's result."""
    import subprocess

    from tests.ports import free_port

    root, port = Path(__file__).resolve().parents[1], free_port()
    out = directory.parent / f"parity-{kind}-tp{tp}-w{world}.json"
    cmd = [sys.executable, "-m", "tests.hf_models", str(directory), kind, str(vocab), str(tp)]
    procs = [
        subprocess.Popen(
            [*cmd, str(out)],
            cwd=root,
            env=rank_env(rank, world, port),
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for rank in range(world)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    codes = [p.returncode for p in procs]
    assert codes == [0] * world, f"exit codes {codes}:\n{outputs[0][-4000:]}"
    return dict(json.loads(out.read_text()))


def parity_tokens(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, TOKENS, generator=torch.Generator().manual_seed(7))


def main(argv: list[str]) -> int:
    import torch.distributed as dist

    from kubetron_api.config import RecipeSpec, TrainerConfig
    from kubetron_api.dims import ParallelDims
    from kubetron_trainer.hf import load_hf_weights
    from kubetron_trainer.models.build import build_model
    from kubetron_trainer.parallel import build_process_groups, init_distributed
    from kubetron_trainer.seeding import setup_megatron_globals
    from kubetron_trainer.topology import Topology

    directory, kind, vocab, tp, out = Path(argv[0]), argv[1], int(argv[2]), int(argv[3]), argv[4]
    arch = model_spec(kind, vocab).resolve()
    topology = Topology.from_env()
    os.environ.setdefault("MASTER_ADDR", topology.master_addr)
    os.environ.setdefault("MASTER_PORT", str(topology.master_port))
    init_distributed(topology, "gloo")
    dims = ParallelDims.from_degrees(topology.world_size, tp=tp)
    pg = build_process_groups(dims, topology, "gloo").pg
    assert pg is not None
    setup_megatron_globals(pg, 1)
    cfg = TrainerConfig(model=arch, recipe=RecipeSpec(precision="fp32", seq_length=TOKENS[1]))
    built = build_model(cfg, dims, pg, torch.device("cpu"), "sdpa")
    load_hf_weights(built.chunks, pg, arch, directory, built.padded_vocab_size)
    tokens = parity_tokens(vocab)
    positions = torch.arange(TOKENS[1]).expand(*TOKENS)
    with torch.no_grad():
        local = built.chunks[0].eval()(tokens, positions, None).contiguous()
    parts = [torch.empty_like(local) for _ in range(pg.tp.size())]
    dist.all_gather(parts, local, group=pg.tp)
    ours = torch.cat(parts, dim=-1)[..., :vocab]
    if topology.rank == 0:
        import transformers

        ref = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
        with torch.no_grad():
            theirs = ref(tokens).logits
        diff = (ours - theirs).abs().max().item()
        result = {"max_diff": diff, "max_logit": theirs.abs().max().item(), "tp": pg.tp.size()}
        Path(out).write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
