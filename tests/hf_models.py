"""Tiny random Hugging Face models (transformers, CPU) and kubetron's view of them.

`python -m tests.hf_models parity DIR KIND VOCAB TP OUT [PP [EP [DEVICE]]]` is one rank of a
parity check (torchrun's variables in the environment): it builds kubetron's GPTModel for `KIND`
in that shape (data-parallel over the rest of the world), loads the Hugging Face checkpoint in
DIR through `kubetron_trainer.models.hf_weights`, and the last stage's first rank writes to
OUT the largest difference between the gathered logits and the transformers model's on the
same tokens.
`... save DIR KIND VOCAB TP CKPT 1 EP` instead saves the loaded weights as step 1 of a kubetron
checkpoint (model only, what export reads): Megatron's MoE layers build on the CPU but route
tokens only on CUDA, so an MoE model goes through the CPU tiers this way.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from kubetron_api.config import ModelArch, ModelSpec

ROOT = Path(__file__).resolve().parents[1]

# kind -> (preset, what the tiny model keeps of it: its own numbers are in OVERRIDES)
PRESET = {
    "qwen3": "qwen3-0.6b", "llama": "llama3-8b", "llama31": "llama3.1-8b",
    "qwen3_moe": "qwen3-30b-a3b",
}  # fmt: skip
OVERRIDES: dict[str, Any] = {
    "numLayers": 2, "hiddenSize": 64, "ffnHiddenSize": 128, "numAttentionHeads": 4,
    "numQueryGroups": 2, "kvChannels": 16, "maxPositionEmbeddings": 512,
}  # fmt: skip
MOE_OVERRIDES = {"numExperts": 4, "moeRouterTopk": 2, "moeFfnHiddenSize": 32}
TOKENS = (2, 24)  # batch, sequence of the parity check


def model_spec(kind: str, vocab: int) -> ModelSpec:
    moe = MOE_OVERRIDES if kind == "qwen3_moe" else {}
    return ModelSpec.model_validate(
        {"preset": PRESET[kind], "overrides": {**OVERRIDES, **moe, "vocabSize": vocab}}
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
    if arch.rope_scaling_factor is not None:  # transformers 5: theta and scaling in one dict
        from kubetron_api.hf_config import rope_scaling

        theta = common.pop("rope_theta")
        common["rope_parameters"] = {**(rope_scaling(arch) or {}), "rope_theta": theta}
    torch.manual_seed(seed)
    if kind == "qwen3":
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**common))
    elif kind == "qwen3_moe":
        moe = {
            "num_experts": arch.num_experts, "num_experts_per_tok": arch.moe_router_topk,
            "moe_intermediate_size": arch.moe_ffn_hidden_size, "norm_topk_prob": True,
            "decoder_sparse_step": 1, "mlp_only_layers": [],
        }  # fmt: skip
        config = transformers.Qwen3MoeConfig(**common, **moe)
        model = transformers.Qwen3MoeForCausalLM(config)
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
        "PYTHONPATH": os.pathsep.join(
            [*(str(root / d) for d in ("trainer", "api", "operator", ".")),
             os.environ.get("PYTHONPATH", "")]
        ),
        "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
        "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
        "LOCAL_WORLD_SIZE": str(world), "GROUP_RANK": "0",
    }  # fmt: skip


def run_parity(
    directory: Path, kind: str, vocab: int, tp: int, world: int, *more: str
) -> dict[str, Any]:
    """`world` ranks of the parity check (subprocesses; `more`: PP, EP, device); the result."""
    out = directory.parent / f"parity-{kind}-tp{tp}-w{world}.json"
    run_ranks(world, "parity", str(directory), kind, str(vocab), str(tp), str(out), *more)
    return dict(json.loads(out.read_text()))


def run_save(
    directory: Path, kind: str, vocab: int, tp: int, world: int, ckpt: Path, ep: int = 1
) -> None:
    """`world` CPU ranks load the weights in TP `tp` x EP `ep` and save them as step 1 of a
    kubetron checkpoint (model only: what export reads)."""
    run_ranks(world, "save", str(directory), kind, str(vocab), str(tp), str(ckpt), "1", str(ep))


def run_ranks(world: int, *args: str, module: str = "tests.hf_models") -> None:
    """`world` ranks of `python -m MODULE ARGS` on this host; each must exit 0."""
    from devtools.ports import free_port

    port = free_port()
    cmd = [sys.executable, "-m", module, *args]
    procs = [
        subprocess.Popen(
            cmd,
            cwd=ROOT,
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


def export(ckpt: Path, out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`python -m kubetron_trainer.tools.export CKPT OUT ARGS` as a plain command (no launcher)."""
    from devtools.ports import free_port

    cmd = [sys.executable, "-m", "kubetron_trainer.tools.export", str(ckpt), str(out), *args]
    env = rank_env(0, 1, free_port())
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK"):
        env.pop(name)  # a plain command, no launcher
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def exported_tensors(out: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an export: its one file, or the shards its index names (each shard
    holding exactly the tensors the index maps to it)."""
    from safetensors.torch import load_file

    index = out / "model.safetensors.index.json"
    if not index.exists():
        return dict(load_file(out / "model.safetensors"))
    weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
    tensors: dict[str, torch.Tensor] = {}
    for name in sorted(set(weight_map.values())):
        shard = load_file(out / name)
        assert set(shard) == {k for k, v in weight_map.items() if v == name}
        tensors |= shard
    return tensors


def check_round_trip(
    tmp_path: Path, kind: str, vocab: int, tp: int, world: int, ep: int, *export_args: str
) -> None:
    """Weights loaded in one shape and saved as a kubetron checkpoint export to the very
    tensors they came from, with a config.json that transformers loads and this model fits."""
    import transformers
    from safetensors.torch import load_file

    from kubetron_api.hf_config import mismatches

    source, ckpt, out = tmp_path / "hf", tmp_path / "ckpt", tmp_path / "export"
    original = save_hf_model(kind, vocab, source)
    run_save(source, kind, vocab, tp, world, ckpt, ep)
    done = export(ckpt, out, *export_args)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    exported, before = exported_tensors(out), load_file(source / "model.safetensors")
    assert set(exported) == set(before)
    assert all(torch.equal(exported[k], before[k]) for k in before)
    config = json.loads((out / "config.json").read_text())
    assert mismatches(model_spec(kind, vocab).resolve(), config) == []
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tokens = torch.arange(16).reshape(2, 8)
    with torch.no_grad():
        assert torch.equal(back(tokens).logits, original(tokens).logits)


def parity_tokens(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, TOKENS, generator=torch.Generator().manual_seed(7))


def main(argv: list[str]) -> int:
    """parity|save DIR KIND VOCAB TP OUT [PP [EP [DEVICE]]]: one rank of the parity check (OUT:
    its result), or of a save of the loaded weights as step 1 of a checkpoint (OUT: its path)."""
    import torch.distributed as dist

    from kubetron_api.config import RecipeSpec, TrainerConfig
    from kubetron_api.dims import ParallelDims
    from kubetron_trainer.models.build import build_model
    from kubetron_trainer.models.fast_path import EngineChoice
    from kubetron_trainer.models.hf_weights import load_hf_weights
    from kubetron_trainer.runtime.parallel import build_process_groups, init_distributed
    from kubetron_trainer.runtime.seeding import setup_megatron_globals
    from kubetron_trainer.runtime.topology import Topology

    mode, argv = argv[0], argv[1:]
    directory, kind, vocab, tp, out = Path(argv[0]), argv[1], int(argv[2]), int(argv[3]), argv[4]
    pp, ep = (int(argv[5]) if len(argv) > 5 else 1), (int(argv[6]) if len(argv) > 6 else 1)
    on_gpu = len(argv) > 7 and argv[7] == "cuda"
    arch = model_spec(kind, vocab).resolve()
    topology = Topology.from_env()
    os.environ.setdefault("MASTER_ADDR", topology.master_addr)
    os.environ.setdefault("MASTER_PORT", str(topology.master_port))
    backend = "nccl" if on_gpu else "gloo"
    device = torch.device("cuda", topology.local_rank) if on_gpu else torch.device("cpu")
    init_distributed(topology, backend)
    dims = ParallelDims.from_degrees(topology.world_size, tp=tp, pp=pp, ep=ep)
    pg = build_process_groups(dims, topology, backend).pg
    assert pg is not None
    setup_megatron_globals(pg, 1)
    cfg = TrainerConfig(model=arch, recipe=RecipeSpec(precision="fp32", seq_length=TOKENS[1]))
    built = build_model(cfg, dims, pg, device, EngineChoice("sdpa"))
    load_hf_weights(built.chunks, pg, arch, directory, built.padded_vocab_size)
    if mode == "save":
        save_checkpoint(cfg, dims, pg, built, Path(out))
        dist.destroy_process_group()
        return 0
    tokens = parity_tokens(vocab).to(device)
    positions = torch.arange(TOKENS[1], device=device).expand(*TOKENS)
    chunk = built.chunks[0].eval()
    stage, stages = pg.pp.rank(), pg.pp.size()
    with torch.no_grad():
        if stage > 0:  # the previous stage's hidden states, [seq, batch, hidden]
            hidden = torch.empty(TOKENS[1], TOKENS[0], arch.hidden_size, device=device)
            dist.recv(hidden, src=dist.get_global_rank(pg.pp, stage - 1))
            chunk.set_input_tensor(hidden)
        output = chunk(tokens, positions, None).contiguous()
        if stage < stages - 1:
            dist.send(output, dst=dist.get_global_rank(pg.pp, stage + 1))
    if stage == stages - 1:
        parts = [torch.empty_like(output) for _ in range(pg.tp.size())]
        dist.all_gather(parts, output, group=pg.tp)
        ours = torch.cat(parts, dim=-1)[..., :vocab].cpu()
    if stage == stages - 1 and pg.tp.rank() == 0 and pg.dp.rank() == 0:
        import transformers

        ref = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
        with torch.no_grad():
            theirs = ref(tokens.cpu()).logits
        diff = (ours - theirs).abs().max().item()
        result = {
            "max_diff": diff, "max_logit": theirs.abs().max().item(), "tp": pg.tp.size(),
            "pp": stages, "ep": pg.ep.size(), "device": str(device),
        }  # fmt: skip
        Path(out).write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()
    return 0


def save_checkpoint(cfg: Any, dims: Any, pg: Any, built: Any, root: Path) -> None:
    """The chunks' weights as step 1 of a kubetron checkpoint under `root` (model only)."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    from kubetron_api.ckpt_meta import RunIdentity, step_dir, write_latest, write_step_meta
    from kubetron_trainer.runtime.checkpoint import SyncTorchDistSaveStrategy, sharded_model_state

    target = step_dir(root, 1)
    if dist.get_rank() == 0:
        target.mkdir(parents=True)
    dist.barrier()
    state = {"model": sharded_model_state(built.chunks[0], pg)}
    dist_checkpointing.save(state, str(target), sharded_strategy=SyncTorchDistSaveStrategy())
    dist.barrier()
    if dist.get_rank() == 0:
        identity = RunIdentity.from_config(cfg, dims, built.padded_vocab_size)
        write_step_meta(target, identity.step_meta(1, 0))
        write_latest(root, 1)
    dist.barrier()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
