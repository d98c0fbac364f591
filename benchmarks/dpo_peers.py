"""DPO against a peer: kubetron's trainer and TRL's DPOTrainer on one GPU, same model, pairs and
tokens per optimizer step, JSON out.

One invocation, each side in a process of its own, one after the other:

- `kubetron`: the real trainer (`python -m kubetron_trainer`, one process, launched as
  trainer_throughput launches it), recipe dpo, policy and frozen reference co-located on rank 0,
  bf16 (fp32 main weights in the distributed optimizer), `fastPath: on`, data.type preference
  prepared by `kubetron-prepare-data --preference` (its `prepare`) from the pairs below;
- `trl`: TRL's DPOTrainer on the same pairs: fp32 weights under bf16 autocast (`--trl-dtype
  bf16`: bf16 weights), AdamW with the same lr, betas, eps, clipping, no weight decay, constant
  lr, the same beta, sigmoid loss, `per_device_train_batch_size` = the micro-batch and
  `gradient_accumulation_steps` so a step holds the same pairs, `max_length` = the sequence
  length, `precompute_ref_log_probs` off (the reference runs every step), no gradient
  checkpointing, sequential sampling;
- `trl_liger` (GPU, unless `--no-trl-liger`): the same with `use_liger_kernel` (Liger's RMSNorm,
  RoPE and SwiGLU; TRL keeps its own chunked LM-head log-probabilities).

Both start from a Qwen3 of the preset's shape with random weights (transformers' initialisation,
saved with `save_pretrained`, in bf16 on a GPU so both sides start from the same values); the
reference has the same weights (`--distinct-reference`: another seed). Nothing is downloaded: the
tokenizer, built here, has the token ids as its words ("17" is token 17), so text rows spell ids.
A pair's chosen response continues its prompt by `MockDataset`'s rule, the rejected one is
random, and both sides append EOS (kubetron's plain-text pairs, TRL's `add_eos`): each document
is exactly `--seq` tokens, nothing is padded or cut, and a step holds 2 x pairs x seq tokens on
both. TRL reads the rows in the order kubetron's PreferenceDataset reads the pairs; the report's
`token_ids` says whether every token id and loss position of TRL's data loader is kubetron's.

Each side's step time is the wall time between the ends of consecutive optimizer steps
(kubetron: its per-step log lines; TRL: a callback after a CUDA sync), data loading and the
reference forward included; the first two steps are warmup. Tokens/s counts 2 x pairs x seq a
step; MFU is kubetron's formula (`kubetron_trainer.observe.flops`: the policy's forward and
backward plus the reference's forward); peak memory is the process's
`torch.cuda.max_memory_allocated` (kubetron: its summary). The summary's own tokens/s and MFU are
recorded beside (its step clock starts once the reference forward has run). Every step's loss is
compared.

    python -m benchmarks.dpo_peers --output benchmarks/results/dpo_peers.json

`--tiny` checks the plumbing on a CPU: a 2-layer Qwen3, seq 32, 3 steps, fp32 on both sides.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from importlib.metadata import version
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
PATHS = [str(ROOT), str(ROOT / "api"), str(ROOT / "trainer"), str(ROOT / "operator")]
sys.path[:0] = PATHS

from benchmarks.report import machine, versions  # noqa: E402
from devtools.hf_tokenizer import EOS, PAD  # noqa: E402
from devtools.training.launch import launch  # noqa: E402
from kubetron_api.config import PRESETS, ModelArch, ModelSpec, TrainerConfig  # noqa: E402
from kubetron_api.hf_config import hf_config  # noqa: E402

WARMUP = 2  # steps left out of the times, as the trainer's summary leaves them out
PEERS = ("transformers", "trl", "accelerate", "datasets", "tokenizers", "pyarrow")
# What the GPU machine may lack, carried as wheels into .whl (see --help's epilog).
WHEELS = "trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19"
EPILOG = f"""TRL's side needs trl, accelerate and datasets (and datasets' dill and multiprocess):
where they are missing, carry the wheels {WHEELS} (accelerate too where absent), then
`python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl` and
PYTHONPATH=/tmp/site. A side whose imports fail is recorded with the module that failed."""
TINY_MODEL = {
    "numLayers": 2, "hiddenSize": 64, "ffnHiddenSize": 128, "numAttentionHeads": 4,
    "numQueryGroups": 2, "kvChannels": 16, "maxPositionEmbeddings": 256, "vocabSize": 512,
}  # fmt: skip
TINY_INIT_STD = 0.2  # a tiny model's logits near uniform would make every DPO loss ln 2
LOG_STEP = re.compile(r"^(\S+ \S+) \[rank 0\] INFO \S+: step (\d+)/\d+ \|")
LOG_ENGINE = re.compile(r"^\S+ \S+ \[rank 0\] INFO \S+: ((?:fast path|attention path|model).*)")


@dataclass(frozen=True)
class Run:
    """What every side of a peer benchmark trains: the model, the batches and the device."""

    preset: str
    arch: ModelArch
    seq: int
    global_batch: int  # samples (here: pairs) per optimizer step
    micro_batch: int  # samples per forward pass
    steps: int
    seed: int
    device: str  # cuda or cpu
    init_std: float | None  # None: transformers' own initialisation

    @property
    def precision(self) -> str:
        return "bf16" if self.device == "cuda" else "fp32"


@dataclass(frozen=True)
class Shape(Run):
    """What both sides run: the model, the pairs (`Run`) and the optimizer."""

    lr: float
    beta: float

    @property
    def pairs(self) -> int:
        return self.global_batch * self.steps

    @property
    def tokens_per_step(self) -> int:
        return 2 * self.global_batch * self.seq


def shape_of(args: argparse.Namespace) -> Shape:
    if args.tiny:
        arch = ModelSpec.model_validate({"preset": args.preset, "overrides": TINY_MODEL}).resolve()
        return Shape(args.preset, arch, 32, 4, 2, 3, args.seed, "cpu", TINY_INIT_STD, 1e-3,
                     args.beta)  # fmt: skip
    if args.global_batch % args.micro_batch:
        sys.exit("--global-batch must be a multiple of --micro-batch")
    return Shape(
        args.preset, PRESETS[args.preset], args.seq, args.global_batch, args.micro_batch,
        args.steps, args.seed, "cuda", None, args.lr, args.beta,
    )  # fmt: skip


# ------------------------------------------------------------------------------ shared inputs


def save_random_model(
    arch: ModelArch, directory: Path, seed: int, bf16: bool, init_std: float | None = None
) -> None:
    """A Qwen3 of `arch` with random weights, saved as a Hugging Face checkpoint (bf16 for a bf16
    run: both sides then start from exactly these values). Built on the GPU when there is one
    (an 8B model's fp32 initialisation on the CPU takes minutes)."""
    import transformers

    raw = hf_config(arch)
    kind = raw.pop("model_type")
    raw.pop("architectures")
    raw.pop("rope_scaling")  # None for Qwen3; transformers 5 reads rope_theta
    if init_std is not None:
        raw["initializer_range"] = init_std
    torch.manual_seed(seed)
    config = transformers.AutoConfig.for_model(kind, **raw)
    dtype = torch.bfloat16 if bf16 else torch.float32
    with torch.device("cuda" if bf16 and torch.cuda.is_available() else "cpu"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(directory)


def save_tokenizer(vocab_size: int, directory: Path) -> None:
    """A word-level tokenizer whose words are token ids (`str(i)` is token i) up to
    `vocab_size - 2`, then EOS and pad: text spells ids, so any tokenizer user sees the same
    ids. Saved as `save_pretrained` saves a fast tokenizer."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    vocab = {str(i): i for i in range(vocab_size - 2)} | {EOS: vocab_size - 2, PAD: vocab_size - 1}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=PAD))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([AddedToken(EOS, special=True), AddedToken(PAD, special=True)])
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    specials = {"eos_token": EOS, "pad_token": PAD}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **specials}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    (directory / "special_tokens_map.json").write_text(json.dumps(specials))


def pair_rows(shape: Shape) -> list[dict[str, str]]:
    """`shape.pairs` preference rows as text: a prompt of the first half of a `MockDataset`
    sequence, the chosen response its rule's continuation, the rejected one random tokens; with
    the EOS both sides append, every document is `shape.seq` tokens."""
    from kubetron_trainer.data.batches import MockDataset

    words = shape.arch.vocab_size - 2  # the tokenizer's ids below EOS and pad
    mock = MockDataset(words, shape.seq - 2, shape.pairs, shape.seed)
    rows = []
    for idx in range(shape.pairs):
        chosen = mock.sequence(idx)  # seq - 1 tokens
        prompt = len(chosen) // 2
        rejected = np.random.default_rng([shape.seed, idx, 1]).integers(
            words, size=len(chosen) - prompt
        )
        if np.array_equal(rejected, chosen[prompt:]):
            rejected[0] = (rejected[0] + 1) % words
        rows.append({
            "prompt": " ".join(map(str, chosen[:prompt])),
            "chosen": " " + " ".join(map(str, chosen[prompt:])),
            "rejected": " " + " ".join(map(str, rejected)),
        })  # fmt: skip
    return rows


@dataclass(frozen=True)
class Inputs:
    """Everything both sides read, under the work directory."""

    policy: Path
    reference: Path
    tokenizer: Path
    prefix: Path  # kubetron's preference dataset
    rows: Path  # TRL's rows (JSONL), in the order kubetron reads the pairs
    pad: int


def build_inputs(shape: Shape, workdir: Path, distinct_reference: bool) -> Inputs:
    from kubetron_trainer.data.preference import PreferenceDataset
    from kubetron_trainer.tools.prepare import prepare

    policy = workdir / "policy"
    bf16 = shape.precision == "bf16"
    save_random_model(shape.arch, policy, shape.seed, bf16, shape.init_std)
    reference = policy
    if distinct_reference:
        reference = workdir / "reference"
        save_random_model(shape.arch, reference, shape.seed + 1, bf16, shape.init_std)
    tokenizer = workdir / "tokenizer"
    save_tokenizer(shape.arch.vocab_size, tokenizer)
    rows = pair_rows(shape)
    source = workdir / "pairs.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    prefix = workdir / "pairs"
    prepare([str(source)], prefix, tokenizer=str(tokenizer), workers=1, overwrite=True,
            preference=True, progress_interval=1e9)  # fmt: skip
    order = PreferenceDataset(str(prefix), **sample_args(shape, shape.arch.vocab_size - 1)).order
    ordered = workdir / "pairs_in_kubetron_order.jsonl"
    ordered.write_text("".join(json.dumps(rows[int(i)]) + "\n" for i in order))
    return Inputs(policy, reference, tokenizer, prefix, ordered, shape.arch.vocab_size - 1)


def sample_args(shape: Shape, pad: int) -> dict[str, Any]:
    """How the trainer builds its PreferenceDataset for this run (`data.split` 100,0,0)."""
    return {"seq_length": shape.seq, "num_samples": shape.pairs, "seed": shape.seed,
            "split": "100,0,0", "pad": pad}  # fmt: skip


# ------------------------------------------------------------------------------------ kubetron


def kubetron_config(shape: Shape, inputs: Inputs) -> dict[str, Any]:
    arch = shape.arch.model_dump(mode="json", by_alias=True)
    recipe = {
        "kind": "dpo", "trainIters": shape.steps, "globalBatchSize": shape.global_batch,
        "microBatchSize": shape.micro_batch, "seqLength": shape.seq, "seed": shape.seed,
        "precision": shape.precision, "logInterval": 1, "fastPath": "on",
        "dpo": {"beta": shape.beta, "labelSmoothing": 0.0},
        "optimizer": {"lr": shape.lr, "minLr": 0.0, "weightDecay": 0.0, "distributed": True},
        "lrSchedule": {"style": "constant", "warmupIters": 0},
    }  # fmt: skip
    data = {
        "type": "preference", "paths": [{"prefix": str(inputs.prefix)}], "split": "100,0,0",
        "tokenizer": {"type": "huggingface", "name": str(inputs.tokenizer)},
    }  # fmt: skip
    one = {"first": 0, "count": 1}
    models = [
        {"name": name, "model": arch, "preset": shape.preset, "weights": str(weights),
         "trainable": name == "policy", "parallelism": {"tensor": 1}, "ranks": one}
        for name, weights in (("policy", inputs.policy), ("reference", inputs.reference))
    ]  # fmt: skip
    cfg = TrainerConfig.model_validate({
        "jobName": "dpo-peers", "model": arch, "preset": shape.preset,
        "weights": str(inputs.policy), "recipe": recipe, "data": data, "models": models,
        "checkpoint": {"path": None},
    }).model_dump(mode="json", by_alias=True)  # fmt: skip
    cfg["metrics"]["enabled"] = False
    return cfg


def step_ends(log: str) -> list[float]:
    """The times (s) of the trainer's per-step lines, which it writes once a step's loss is on
    the host, in step order."""
    ends: dict[int, float] = {}
    for line in log.splitlines():
        if m := LOG_STEP.match(line):
            ends[int(m[2])] = datetime.strptime(m[1], "%Y-%m-%d %H:%M:%S,%f").timestamp()
    return [ends[s] for s in sorted(ends)]


def timing(ends: list[float], start: float | None, tokens_per_step: int) -> dict[str, Any]:
    """Step times from step-end times (`start`: when step 1 began, if known); tokens/s over the
    steps after the warmup."""
    bounds = ([start] if start is not None else []) + ends
    durations = [b - a for a, b in itertools.pairwise(bounds)]
    skip = WARMUP - (len(ends) - len(durations))  # durations of the warmup steps known here
    timed = durations[max(skip, 0) :]
    if not timed:
        return {"step_s": [round(d, 4) for d in durations]}
    return {
        "tokens_per_s": round(tokens_per_step * len(timed) / sum(timed), 1),
        "median_step_s": round(statistics.median(timed), 4),
        "timed_steps": len(timed),
        "step_s": [round(d, 4) for d in durations],
    }


def train(
    cfg: dict[str, Any], workdir: Path, timeout: float, attention: str = "auto"
) -> tuple[str, dict[str, Any]] | dict[str, Any]:
    """The real trainer on `cfg` in one process (`--attention` as given): its log and summary,
    or what failed."""
    started = launch(cfg, workdir, "--attention", attention,
                     extra_env={"PYTHONPATH": python_path()})  # fmt: skip
    codes = started.wait(timeout=timeout)
    log = started.output()
    if codes != [0]:
        return {"ok": False, "exit_codes": codes, "log_tail": log[-3000:]}
    return log, started.result()


def run_kubetron(shape: Shape, inputs: Inputs, workdir: Path, timeout: float) -> dict[str, Any]:
    ran = train(kubetron_config(shape, inputs), workdir / "kubetron", timeout)
    if isinstance(ran, dict):
        return ran
    log, summary = ran
    steps = summary["steps"]
    return {
        "ok": True,
        **timing(step_ends(log), None, shape.tokens_per_step),
        "peak_memory_gib": summary.get("peak_memory_gib"),
        "losses": [s["loss"] for s in steps],
        "grad_norms": [s["grad_norm"] for s in steps],
        "first_step": steps[0]["extras"],
        "attention": summary["attention"],
        "engines": engine_lines(log),
        "summary_tokens_per_s": round(summary["tokens_per_s"], 1),
        "summary_mfu": summary["mfu"],
        "summary_median_step_s": round(
            statistics.median(s["duration_s"] for s in steps[WARMUP:] or steps), 4
        ),
    }


def engine_lines(log: str) -> list[str]:
    """What the trainer logged of the engines it chose: each model's, the fast path's pieces."""
    return [m[1] for line in log.splitlines() if (m := LOG_ENGINE.match(line))]


def python_path() -> str:
    """The project's directories before whatever PYTHONPATH holds (carried wheels)."""
    return os.pathsep.join([*PATHS, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)


# ----------------------------------------------------------------------------------------- TRL


def run_trl(
    shape: Shape, inputs: Inputs, workdir: Path, name: str, args: argparse.Namespace
) -> dict[str, Any]:
    """TRL in a process of its own (its peak memory its own); the worker writes its result."""
    out = workdir / name
    out.mkdir(parents=True, exist_ok=True)
    dtype = args.trl_dtype if shape.device == "cuda" else "fp32"
    paths = {k: str(v) for k, v in asdict(inputs).items()}
    spec = {"shape": asdict(shape) | {"arch": None}, "inputs": paths, "out": str(out),
            "dtype": dtype, "liger": name.endswith("liger")}  # fmt: skip
    (out / "spec.json").write_text(json.dumps(spec))
    cmd = [sys.executable, "-m", "benchmarks.dpo_peers", "--trl-worker", str(out / "spec.json")]
    env = os.environ | {"PYTHONPATH": python_path(), "HF_HUB_OFFLINE": "1",
                        "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
    with open(out / "log.txt", "w") as log:
        try:
            code = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                  timeout=args.run_timeout).returncode  # fmt: skip
        except subprocess.TimeoutExpired:
            code = 124
    result_file = out / "result.json"
    result: dict[str, Any] = json.loads(result_file.read_text()) if result_file.exists() else {}
    if code != 0 or not result.get("ok"):
        tail = (out / "log.txt").read_text()[-3000:]
        return {"ok": False, "exit_code": code, **result, "log_tail": tail}
    ends, start = result.pop("step_ends"), result.pop("train_began")
    return {**result, **timing(ends, start, shape.tokens_per_step)}


def trl_worker(spec_file: Path) -> int:
    """One TRL run (`--trl-worker SPEC`): writes result.json, and tokens.npz with every pair its
    data loader gives, in training order."""
    spec = json.loads(spec_file.read_text())
    out = Path(spec["out"])
    missing = missing_import()
    if missing is not None:
        (out / "result.json").write_text(json.dumps({"ok": False, "import_error": missing}))
        return 1
    trainer, clock = trl_trainer(spec)
    dump_tokens(trainer, spec, out / "tokens.npz")
    trainer.train()
    cuda = torch.cuda.is_available() and spec["shape"]["device"] == "cuda"
    history = [h for h in trainer.state.log_history if "loss" in h]
    stats = {
        "chosen_reward": "rewards/chosen", "rejected_reward": "rewards/rejected",
        "reward_margin": "rewards/margins", "reward_accuracy": "rewards/accuracies",
    }  # fmt: skip
    result = {
        "ok": True,
        "losses": [h["loss"] for h in history],
        "grad_norms": [h.get("grad_norm") for h in history],
        "first_step": {ours: history[0].get(theirs) for ours, theirs in stats.items()},
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        "settings": trl_settings(trainer),
        "step_ends": clock.ends,
        "train_began": clock.began,
    }
    (out / "result.json").write_text(json.dumps(result))
    return 0


def missing_import() -> str | None:
    """The first of TRL's side's modules that does not import, with the error; None if all do."""
    for name in ("transformers", "accelerate", "datasets", "trl"):
        try:
            __import__(name)
        except Exception as err:  # an ImportError, or a version check failing at import
            return f"{name}: {type(err).__name__}: {err}"
    return None


def trl_trainer(spec: dict[str, Any]) -> tuple[Any, Any]:
    """TRL's DPOTrainer for `spec` and the callback that clocks its steps."""
    import datasets
    import transformers
    from trl import DPOConfig, DPOTrainer

    shape, inputs = spec["shape"], spec["inputs"]
    on_gpu = shape["device"] == "cuda"
    weights_dtype = torch.bfloat16 if spec["dtype"] == "bf16" else torch.float32
    device = torch.device("cuda" if on_gpu else "cpu")

    def load(path: str) -> Any:
        model: Any = transformers.AutoModelForCausalLM.from_pretrained(
            path, dtype=weights_dtype, attn_implementation="sdpa"
        )
        return model.to(device)

    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(Path(inputs["tokenizer"]) / "tokenizer.json"),
        eos_token=EOS, pad_token=PAD,
    )  # fmt: skip
    rows = [json.loads(line) for line in Path(inputs["rows"]).read_text().splitlines()]
    config = DPOConfig(
        output_dir=spec["out"], per_device_train_batch_size=shape["micro_batch"],
        gradient_accumulation_steps=shape["global_batch"] // shape["micro_batch"],
        max_steps=shape["steps"], learning_rate=shape["lr"], lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8,
        max_grad_norm=1.0, beta=shape["beta"], loss_type=["sigmoid"], label_smoothing=0.0,
        max_length=shape["seq"], precompute_ref_log_probs=False, gradient_checkpointing=False,
        bf16=on_gpu, fp16=False, use_cpu=not on_gpu, train_sampling_strategy="sequential",
        logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
        seed=shape["seed"], dataloader_num_workers=0, use_liger_kernel=spec["liger"],
    )  # fmt: skip
    clock = step_clock(transformers, on_gpu)
    trainer = DPOTrainer(
        model=load(inputs["policy"]), ref_model=load(inputs["reference"]), args=config,
        train_dataset=datasets.Dataset.from_list(rows), processing_class=tokenizer,
        callbacks=[clock],
    )  # fmt: skip
    return trainer, clock


def step_clock(transformers: Any, cuda: bool) -> Any:
    """A TrainerCallback noting when training began and when each optimizer step ended (after
    a CUDA sync, so the step's kernels are done)."""

    class StepClock(transformers.TrainerCallback):  # type: ignore[misc]
        def __init__(self) -> None:
            self.began: float | None = None
            self.ends: list[float] = []

        def now(self) -> float:
            if cuda:
                torch.cuda.synchronize()
            return time.time()

        def on_train_begin(self, *args: Any, **kwargs: Any) -> None:
            self.began = self.now()

        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            self.ends.append(self.now())

    return StepClock()


def dump_tokens(trainer: Any, spec: dict[str, Any], path: Path) -> None:
    """Every pair TRL's data loader gives, in order: input ids and completion masks
    `[pairs, 2 (chosen, rejected), length]`."""
    ids: list[torch.Tensor] = []
    masks: list[torch.Tensor] = []
    pairs = spec["shape"]["global_batch"] * spec["shape"]["steps"]
    for batch in trainer.get_train_dataloader():
        for key, into in (("input_ids", ids), ("completion_mask", masks)):
            chosen, rejected = batch[key].cpu().chunk(2)
            into.append(torch.stack([chosen, rejected], dim=1))
        if sum(int(i.shape[0]) for i in ids) >= pairs:
            break
    np.savez(path, input_ids=torch.cat(ids).numpy(), completion_mask=torch.cat(masks).numpy())


def trl_settings(trainer: Any) -> dict[str, Any]:
    """What TRL ran with, as it resolved it."""
    args, model = trainer.args, trainer.model
    return {
        "weights_dtype": str(next(model.parameters()).dtype),
        "reference_dtype": str(next(trainer.ref_model.parameters()).dtype),
        "bf16_autocast": bool(args.bf16), "optim": getattr(args.optim, "value", args.optim),
        "attn_implementation": model.config._attn_implementation,
        "per_device_train_batch_size": args.per_device_train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "max_length": args.max_length, "padding_free": bool(args.padding_free),
        "precompute_ref_log_probs": bool(args.precompute_ref_log_probs),
        "gradient_checkpointing": bool(args.gradient_checkpointing),
        "use_liger_kernel": bool(args.use_liger_kernel), "loss_type": list(args.loss_type),
    }  # fmt: skip


# ---------------------------------------------------------------------------------- comparison


def token_check(shape: Shape, inputs: Inputs, trl_dir: Path) -> dict[str, Any]:
    """Whether TRL's pairs are kubetron's, token for token and loss position for position:
    TRL's completion mask on input token j+1 is kubetron's loss mask on label j."""
    from kubetron_trainer.data.preference import PreferenceDataset

    dumped = trl_dir / "tokens.npz"
    if not dumped.exists():
        return {"checked": False}
    theirs = np.load(dumped)
    ids, completion = theirs["input_ids"], theirs["completion_mask"]
    ours = PreferenceDataset(str(inputs.prefix), **sample_args(shape, inputs.pad))
    differ = []
    for i in range(shape.pairs):
        s = ours[i]
        tokens, mask = s["tokens"].numpy(), s["loss_mask"].numpy()
        same = ids.shape[1:] == (2, shape.seq) and np.array_equal(tokens, ids[i])
        same = same and np.array_equal(mask[:, :-1], completion[i][:, 1:]) and not mask[:, -1].any()
        if not same:
            differ.append(i)
    return {
        "checked": True, "pairs": shape.pairs, "trl_shape": list(ids.shape),
        "identical": not differ and len(ids) >= shape.pairs, "pairs_differing": differ[:10],
        "learned_tokens_first_row": int(completion[0, 0].sum()),
    }  # fmt: skip


def mfu(tokens_per_s: float | None, shape: Shape) -> dict[str, Any]:
    """MFU by the trainer's formula: the policy's forward and backward plus the reference's
    forward, per token, against the GPU's dense bf16 peak."""
    from kubetron_trainer.models.megatron_config import padded_vocab_size
    from kubetron_trainer.observe.flops import flops_per_token, forward_flops_per_token, peak_flops

    vocab = padded_vocab_size(shape.arch.vocab_size, 1)
    per_token = flops_per_token(shape.arch, shape.seq, vocab)
    per_token += forward_flops_per_token(shape.arch, shape.seq, vocab)
    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    peak = peak_flops(name, shape.precision)
    value = tokens_per_s * per_token / peak if tokens_per_s and peak else None
    return {"mfu": round(value, 4) if value else None, "flops_per_token": per_token,
            "peak_flops": peak}  # fmt: skip


def compare(ours: dict[str, Any], theirs: dict[str, Any]) -> dict[str, Any]:
    """kubetron against one TRL run: the speed ratio and the losses' differences."""
    if not (ours.get("ok") and theirs.get("ok")):
        return {}
    out: dict[str, Any] = {}
    if ours.get("tokens_per_s") and theirs.get("tokens_per_s"):
        out["tokens_per_s_kubetron_over_trl"] = round(
            ours["tokens_per_s"] / theirs["tokens_per_s"], 4
        )
    diffs = [abs(a - b) for a, b in zip(ours["losses"], theirs["losses"], strict=False)]
    out["first_loss_abs_diff"] = diffs[0] if diffs else None
    out["loss_abs_diff_per_step"] = diffs
    out["first_step_abs_diff"] = {
        k: abs(v - theirs["first_step"][k])
        for k, v in ours["first_step"].items()
        if theirs["first_step"].get(k) is not None
    }
    return out


# ---------------------------------------------------------------------------------------- main


def peer_versions(names: tuple[str, ...] = PEERS) -> dict[str, Any]:
    """The peers' versions and where each one is imported from (the image, or carried wheels)."""
    found: dict[str, Any] = {"from": {}}
    for name in names:
        spec = find_spec(name)
        found["from"][name] = str(Path(spec.origin).parents[1]) if spec and spec.origin else None
        found[name] = version(name) if found["from"][name] else None
    return found


def head(args: argparse.Namespace, shape: Shape) -> dict[str, Any]:
    init = "transformers' init" + (f", std {shape.init_std}" if shape.init_std else "")
    trl_weights = "fp32" if args.tiny else "fp32 under bf16 autocast"
    if args.trl_dtype == "bf16" and not args.tiny:
        trl_weights = "bf16"
    described = {
        "preset": shape.preset, "layers": shape.arch.num_layers, "seq_length": shape.seq,
        "pairs_per_step": shape.global_batch, "pairs_per_micro_batch": shape.micro_batch,
        "tokens_per_step": shape.tokens_per_step, "steps": shape.steps,
        "warmup_steps_excluded": WARMUP, "lr": shape.lr, "beta": shape.beta,
        "label_smoothing": 0.0, "precision": shape.precision,
        "weights": f"random ({init}), saved in {shape.precision}",
        "reference": "other random weights" if args.distinct_reference else "the same weights",
        "trl_weights": trl_weights,
        "tokens_counted": "2 x pairs x seq per step; every row is seq tokens, no padding",
    }  # fmt: skip
    return {
        "benchmark": "dpo_peers",
        "command": "python -m benchmarks.dpo_peers " + shlex.join(sys.argv[1:]),
        "machine": machine(),
        "versions": versions() | peer_versions(),
        "shape": described,
        "results": {},
        "comparison": {},
        "errors": {},
    }


def write(report: dict[str, Any], output: Path | None) -> None:
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(report, indent=1) + "\n")


def settle(report: dict[str, Any], name: str, shape: Shape) -> None:
    """A side's MFU and its comparison with kubetron, or its error; the report rewritten."""
    result = report["results"][name]
    if not result.get("ok"):
        report["errors"][name] = result.get("import_error") or "failed: see its log_tail"
    else:
        result |= mfu(result.get("tokens_per_s"), shape)
        if name != "kubetron":
            report["comparison"][name] = compare(report["results"]["kubetron"], result)
    done = f"{result.get('tokens_per_s')} tokens/s" if result.get("ok") else "failed"
    print(f"[dpo_peers] {name}: {done}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    shape = shape_of(args)
    if shape.device == "cuda" and not torch.cuda.is_available():
        sys.exit("dpo_peers needs a CUDA GPU (or --tiny)")
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    report = head(args, shape)
    inputs = build_inputs(shape, workdir, args.distinct_reference)
    report["results"]["kubetron"] = run_kubetron(shape, inputs, workdir, args.run_timeout)
    settle(report, "kubetron", shape)
    write(report, args.output)  # after each side: a run cut off keeps what finished
    sides = ["trl"] + (["trl_liger"] if shape.device == "cuda" and args.trl_liger else [])
    for name in sides:
        report["results"][name] = run_trl(shape, inputs, workdir, name, args)
        if name == "trl":
            report["token_ids"] = token_check(shape, inputs, workdir / name)
        settle(report, name, shape)
        write(report, args.output)
    print(json.dumps(report, indent=1))
    return 1 if report["errors"] or not report["token_ids"].get("identical") else 0


def add_run_args(p: argparse.ArgumentParser, name: str, timeout: float) -> None:
    """What every side-by-side benchmark takes: its time per side, work directory and output."""
    p.add_argument("--run-timeout", type=float, default=timeout, help="seconds per side")
    p.add_argument("--workdir", default=f"/tmp/kubetron-{name}")
    p.add_argument("--output", type=Path, help="also write the JSON report here")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=(__doc__ or "").splitlines()[0], epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    p.add_argument("--preset", default="qwen3-0.6b", choices=sorted(PRESETS))
    p.add_argument("--seq", type=int, default=2048, help="tokens per sequence (default 2048)")
    p.add_argument("--global-batch", type=int, default=16, help="pairs per step (default 16)")
    p.add_argument("--micro-batch", type=int, default=2, help="pairs per forward (default 2)")
    p.add_argument("--steps", type=int, default=12, help="optimizer steps (default 12)")
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument(
        "--trl-dtype", choices=["autocast", "bf16"], default="autocast",
        help="TRL's weights: fp32 under bf16 autocast (default), or bf16",
    )  # fmt: skip
    p.add_argument("--no-trl-liger", dest="trl_liger", action="store_false",
                   help="skip the TRL run with use_liger_kernel")  # fmt: skip
    p.add_argument("--distinct-reference", action="store_true",
                   help="the reference gets other random weights than the policy")  # fmt: skip
    p.add_argument("--tiny", action="store_true",
                   help="CPU plumbing check: 2-layer Qwen3, seq 32, 3 steps, fp32")  # fmt: skip
    add_run_args(p, "dpo-peers", 420)
    p.add_argument("--trl-worker", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.trl_worker is not None:
        return trl_worker(args.trl_worker)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
