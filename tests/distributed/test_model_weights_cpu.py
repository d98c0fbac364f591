"""A model's weights from a kubetron checkpoint of another parallel shape, on CPU (gloo).

One launch of four ranks (`python -m tests.distributed.test_model_weights_cpu`): a tiny Qwen3
loaded from Hugging Face weights in TP2 x DP2 is saved as a multi-model job saves its trained
model (`CKPT/policy/`), then a second model built in DP4 (TP1) starts from that directory with
`load_model_weights`: its logits equal the TP2 model's on every rank. The vocabulary (600) is
padded to 768 rows in TP2 and to 640 in TP1, so the embedding and output layer are resharded
across paddings too. `kubetron-export --model policy` writes the very weights they came from.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from kubetron_api.hf_config import check_model_weights
from tests.hf_models import (
    PRESET,
    TOKENS,
    export,
    exported_tensors,
    model_spec,
    parity_tokens,
    run_ranks,
    save_hf_model,
)

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
VOCAB = 600  # padded to 640 in TP1, 768 in TP2
FIELD = "spec.models[0].weights"
MODEL = "policy"


def test_weights_from_a_checkpoint_of_another_shape_give_the_same_logits(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    hf, ckpt, out = tmp_path / "hf", tmp_path / "ckpt", tmp_path / "result.json"
    save_hf_model("qwen3", VOCAB, hf)
    run_ranks(4, str(hf), str(ckpt), str(out), module="tests.distributed.test_model_weights_cpu")
    result = json.loads(out.read_text())
    assert result["padded"] == [768, 640] and result["step"] == 1
    assert result["max_logit"] > 0.5  # random N(0, 0.2) weights give logits of size
    assert result["max_diff"] <= 1e-5, result
    arch = model_spec("qwen3", VOCAB).resolve()
    assert check_model_weights(arch, PRESET["qwen3"], ckpt / MODEL, FIELD) == "kubetron"

    exported = tmp_path / "export"
    done = export(ckpt, exported, "--model", MODEL)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    tensors, before = exported_tensors(exported), load_file(hf / "model.safetensors")
    assert set(tensors) == set(before)
    assert all(torch.equal(tensors[k], before[k]) for k in before)


def logits(chunk: torch.nn.Module, tp: torch.distributed.ProcessGroup) -> torch.Tensor:
    """The chunk's logits on the parity tokens, gathered over its tensor-parallel group and cut
    to the vocabulary."""
    import torch.distributed as dist

    tokens = parity_tokens(VOCAB)
    positions = torch.arange(TOKENS[1]).expand(*TOKENS)
    with torch.no_grad():
        output = chunk.eval()(tokens, positions, None).contiguous()
    parts = [torch.empty_like(output) for _ in range(tp.size())]
    dist.all_gather(parts, output, group=tp)
    return torch.cat(parts, dim=-1)[..., :VOCAB]


def main(argv: list[str]) -> int:
    """HF_DIR CKPT OUT: one rank. Saves the weights loaded in TP2 x DP2 as CKPT/policy, loads
    them in DP4 and writes to OUT the largest logit difference over every rank."""
    import torch.distributed as dist

    from kubetron_api.config import RecipeSpec, TrainerConfig
    from kubetron_api.dims import ParallelDims
    from kubetron_trainer.models.build import build_model
    from kubetron_trainer.models.fast_path import EngineChoice
    from kubetron_trainer.models.hf_weights import load_hf_weights
    from kubetron_trainer.runtime.checkpoint import load_model_weights
    from kubetron_trainer.runtime.parallel import (
        GridSpec,
        build_process_groups_multi,
        init_distributed,
        setup_megatron_globals,
    )
    from kubetron_trainer.runtime.topology import Topology
    from tests.hf_models import save_checkpoint

    hf, ckpt, out = (Path(a) for a in argv)
    topology = Topology.from_env()
    init_distributed(topology, "gloo")
    shapes = {"saved": ParallelDims.from_degrees(4, tp=2), "loaded": ParallelDims.from_degrees(4)}
    grids = build_process_groups_multi(
        [GridSpec(name, dims) for name, dims in shapes.items()], topology, "gloo"
    )
    saved_pg, loaded_pg = grids["saved"].pg, grids["loaded"].pg
    assert saved_pg is not None and loaded_pg is not None
    setup_megatron_globals(saved_pg, 1)
    arch = model_spec("qwen3", VOCAB).resolve()
    recipe = RecipeSpec(precision="fp32", seq_length=TOKENS[1])
    cfg = TrainerConfig(model=arch, preset=PRESET["qwen3"], recipe=recipe)
    cpu, engine = torch.device("cpu"), EngineChoice("sdpa")
    saved = build_model(cfg, shapes["saved"], saved_pg, cpu, engine)
    load_hf_weights(saved.chunks, saved_pg, arch, hf, saved.padded_vocab_size)
    save_checkpoint(cfg, shapes["saved"], saved_pg, saved, ckpt / MODEL)
    loaded = build_model(cfg, shapes["loaded"], loaded_pg, cpu, engine)
    step = load_model_weights(loaded.chunks, loaded_pg, ckpt / MODEL, FIELD)
    want = logits(saved.chunks[0], saved_pg.tp)
    got = logits(loaded.chunks[0], loaded_pg.tp)
    diff = torch.tensor([(got - want).abs().max().item()])
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    if dist.get_rank() == 0:
        result = {
            "step": step, "max_diff": diff.item(), "max_logit": want.abs().max().item(),
            "padded": [saved.padded_vocab_size, loaded.padded_vocab_size],
        }  # fmt: skip
        out.write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main(sys.argv[1:]))
