"""kubetron's own metadata of a checkpoint directory, and the checks made before a resume.

Torch-free (the `kubetron checkpoints` command and the trainer's pre-flight check import it).

Layout under `checkpoint.path`::

    latest                 the step of the newest complete checkpoint ("20\\n")
    iter_0000020/          one directory per saved step
      kubetron.json        this module's metadata, written by rank 0 after every rank's shards
      .metadata            torch DCP's index of the shards, written when every rank's are
      __<r>_<i>.distcp     the shards (Megatron's common state included)
      metadata.json        Megatron dist_checkpointing's (backend torch_dist), written after

A save writes the shards, then `kubetron.json` (atomically), then `latest` (atomically): a
directory without `kubetron.json` is a save that did not finish. `kubetron.json` holds the
format version, the step, the consumed samples, the model (preset, resolved architecture,
padded vocabulary) and the parallel shape it was written with. A step directory with Megatron's
files but no `kubetron.json` was written before format 1 (`legacy`): it loads, unchecked.

`plan_resume` decides, from these files only, whether and how a run resumes; everything it
refuses raises `ConfigError` (exit code 2, permanent) before anything is loaded or written.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kubetron_api.dims import ParallelDims
from kubetron_api.exitcodes import ConfigError
from kubetron_api.wire import ATTEMPT_ENV, JOB_UID_ENV

FORMAT = 1  # bump when a reader of the previous format would misread a new checkpoint
META_FILE = "kubetron.json"
LATEST = "latest"
MEGATRON_FILES = (".metadata", "metadata.json")


def step_dir(root: Path, step: int) -> Path:
    return root / f"iter_{step:07d}"


def parse_step_dir(name: str) -> int | None:
    """The step of a directory name `iter_NNNNNNN`, or None."""
    digits = name.removeprefix("iter_")
    return int(digits) if name.startswith("iter_") and digits.isdigit() else None


def read_latest(root: Path) -> int | None:
    """The step `root/latest` points to, or None when there is no `latest`."""
    marker = root / LATEST
    if not marker.is_file():
        return None
    text = marker.read_text().strip()
    if not text.isdigit():
        raise ConfigError(
            "checkpoint.path",
            f"{marker} holds {text!r}, not a step number; write the step of a complete "
            f"checkpoint into it (`kubetron checkpoints {root}` lists them) or remove it to "
            "start from step 0",
        )
    return int(text)


def _write_atomically(path: Path, text: str) -> None:
    """Replace `path` by `text`: readers see the old or the new content, never half."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_latest(root: Path, step: int) -> None:
    """Atomically point `latest` at `step`."""
    _write_atomically(root / LATEST, f"{step}\n")


# Fencing by attempt. The operator runs a job as attempts (a whole-group restart starts the next)
# and tells each pod its attempt and the job's uid. An attempt claims the checkpoint directory at
# start (`attempt` file: "<job uid> <attempt>"); a pod of an older attempt of the same job (a
# zombie on a lost node, say) then refuses to save: it can never replace a newer `latest`.
# The two variables are the wire's (ATTEMPT_ENV, JOB_UID_ENV).
FENCE_FILE = "attempt"


@dataclass(frozen=True)
class Attempt:
    job_uid: str
    number: int

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Attempt | None:
        """The pod's attempt, or None outside the operator (no fencing)."""
        uid, number = env.get(JOB_UID_ENV, ""), env.get(ATTEMPT_ENV, "")
        return cls(uid, int(number)) if uid and number.isdigit() else None


def read_fence(root: Path) -> Attempt | None:
    parts = (root / FENCE_FILE).read_text().split() if (root / FENCE_FILE).is_file() else []
    return Attempt(parts[0], int(parts[1])) if len(parts) == 2 and parts[1].isdigit() else None


def check_fence(root: Path, mine: Attempt | None) -> None:
    """Raise when a newer attempt of this job has claimed `root` (this pod must not write)."""
    fence = read_fence(root) if mine is not None else None
    if mine and fence and fence.job_uid == mine.job_uid and fence.number > mine.number:
        raise ConfigError(
            "checkpoint.path",
            f"{root} belongs to attempt {fence.number} of this job; this pod is of attempt "
            f"{mine.number}, which the operator replaced, so it writes nothing",
        )


def claim(root: Path, mine: Attempt | None) -> None:
    """Claim `root` for this attempt (rank 0, at start); another job's claim is replaced."""
    if mine is None:
        return
    check_fence(root, mine)
    root.mkdir(parents=True, exist_ok=True)
    _write_atomically(root / FENCE_FILE, f"{mine.job_uid} {mine.number}\n")


# ParallelDims field -> its key in kubetron.json (the MegatronJob's parallelism names)
_SHAPE_KEYS = {"world_size": "worldSize", "tp": "tensor", "pp": "pipeline",
               "vpp": "virtualPipeline", "cp": "context", "ep": "expert",
               "etp": "expertTensor", "dp": "data"}  # fmt: skip


def shape_to_json(dims: ParallelDims) -> dict[str, int]:
    return {key: int(getattr(dims, field)) for field, key in _SHAPE_KEYS.items()}


def shape_from_json(raw: dict[str, Any]) -> ParallelDims:
    """The shape as written (not re-validated: it was valid for the run that wrote it)."""
    return ParallelDims(**{f: int(raw[k]) for f, k in _SHAPE_KEYS.items() if k in raw})


def describe_shape(dims: ParallelDims) -> str:
    """`TP2 x DP2 (world 4)`: the degrees above 1, then the world size."""
    degrees = (("TP", dims.tp), ("PP", dims.pp), ("VPP", dims.vpp), ("CP", dims.cp),
               ("EP", dims.ep), ("ETP", dims.etp), ("DP", dims.dp))  # fmt: skip
    parts = [f"{name}{value}" for name, value in degrees if value > 1]
    return f"{' x '.join(parts) or 'one rank'} (world {dims.world_size})"


@dataclass(frozen=True)
class ModelId:
    """What must be equal for a checkpoint's weights to fit: the resolved architecture (camelCase
    ModelArch fields) and the vocabulary as padded for the tensor-parallel degree. The preset is
    kept for messages; two presets with the same numbers are the same model."""

    preset: str
    arch: dict[str, Any]
    padded_vocab_size: int

    @classmethod
    def from_config(cls, cfg: Any, padded_vocab_size: int) -> ModelId:
        """From a `config.TrainerConfig`."""
        return cls(cfg.preset, cfg.model.model_dump(mode="json", by_alias=True), padded_vocab_size)

    def describe(self) -> str:
        a = self.arch
        moe = f", {a['numExperts']} experts" if a.get("numExperts") else ""
        return (
            f"{self.preset} ({a.get('numLayers')} layers, hidden {a.get('hiddenSize')}, "
            f"vocab {a.get('vocabSize')}{moe})"
        )

    def to_json(self) -> dict[str, Any]:
        return {"preset": self.preset, "paddedVocabSize": self.padded_vocab_size, "arch": self.arch}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> ModelId:
        return cls(str(raw["preset"]), dict(raw["arch"]), int(raw["paddedVocabSize"]))


# What a fingerprint of base weights reads of each safetensors file besides its name, size and
# header (every tensor's name, dtype, shape and offsets): this many bytes of the data at its
# start and at its end. Reading whole files at every start would cost minutes for 8B weights.
FINGERPRINT_SAMPLE = 1 << 20


def weights_fingerprint(directory: Path) -> str:
    """A fingerprint of a Hugging Face checkpoint directory: config.json, and each safetensors
    file's name, size, header and first and last FINGERPRINT_SAMPLE bytes of data (sha256)."""
    digest = hashlib.sha256()
    config = directory / "config.json"
    digest.update(config.read_bytes() if config.is_file() else b"")
    for path in sorted(directory.glob("*.safetensors")):
        size = path.stat().st_size
        digest.update(f"{path.name}:{size}".encode())
        with open(path, "rb") as f:
            header = int.from_bytes(f.read(8), "little")
            digest.update(f.read(min(header + FINGERPRINT_SAMPLE, size)))
            f.seek(max(size - FINGERPRINT_SAMPLE, 0))
            digest.update(f.read())
    return digest.hexdigest()


# The settings of recipe.peft that shape a LoRA checkpoint's tensors (camelCase); dropout and
# `adapters` (where they started) do not.
PEFT_SHAPE = ("type", "rank", "alpha", "targets")


@dataclass(frozen=True)
class PeftId:
    """What a LoRA checkpoint records: its adapters' settings and the base weights (Hugging
    Face directory, spec.model.weights, and its `weights_fingerprint`) they were trained on;
    the checkpoint holds the adapters alone."""

    settings: dict[str, Any]
    base: str
    fingerprint: str

    @classmethod
    def from_config(cls, cfg: Any) -> PeftId | None:
        """From a `config.TrainerConfig` (None without recipe.peft); reads the base's files."""
        peft = cfg.recipe.peft
        if peft is None or cfg.weights is None:
            return None
        settings = peft.model_dump(mode="json", by_alias=True)
        shape = {k: settings[k] for k in PEFT_SHAPE}
        return cls(shape, cfg.weights, weights_fingerprint(Path(cfg.weights)))

    def to_json(self) -> dict[str, Any]:
        return {**self.settings, "base": {"weights": self.base, "fingerprint": self.fingerprint}}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> PeftId:
        base = raw["base"]
        settings = {k: raw[k] for k in PEFT_SHAPE}
        return cls(settings, str(base["weights"]), str(base["fingerprint"]))


@dataclass(frozen=True)
class StepMeta:
    """The contents of one step directory's `kubetron.json`."""

    step: int
    consumed_samples: int  # samples read before this step: the data position
    global_batch_size: int
    model: ModelId
    shape: ParallelDims
    seed: int
    saved_at: str = ""
    format: int = FORMAT
    attempt: int = 0  # the operator's attempt that wrote it (0: not run by the operator)
    peft: PeftId | None = None  # a LoRA checkpoint: the adapters alone, on these base weights

    def to_json(self) -> dict[str, Any]:
        peft = {"peft": self.peft.to_json()} if self.peft is not None else {}
        return {
            "format": self.format,
            "step": self.step,
            "consumedSamples": self.consumed_samples,
            "globalBatchSize": self.global_batch_size,
            "seed": self.seed,
            "model": self.model.to_json(),
            "shape": shape_to_json(self.shape),
            "rng": "one state per rank, restored only into the same shape",
            "savedAt": self.saved_at,
            "attempt": self.attempt,
            **peft,
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> StepMeta:
        return cls(
            step=int(raw["step"]),
            consumed_samples=int(raw["consumedSamples"]),
            global_batch_size=int(raw["globalBatchSize"]),
            model=ModelId.from_json(raw["model"]),
            shape=shape_from_json(raw["shape"]),
            seed=int(raw["seed"]),
            saved_at=str(raw.get("savedAt", "")),
            format=int(raw["format"]),
            attempt=int(raw.get("attempt", 0)),
            peft=PeftId.from_json(raw["peft"]) if raw.get("peft") else None,
        )


def write_step_meta(directory: Path, meta: StepMeta) -> None:
    """Write `kubetron.json` (atomically), stamped with the time; the save's last file before
    `latest`."""
    if not meta.saved_at:
        stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        meta = replace(meta, saved_at=stamp)
    _write_atomically(directory / META_FILE, json.dumps(meta.to_json(), indent=1) + "\n")


class NewerFormat(Exception):
    """`kubetron.json` of a format this trainer does not read."""

    def __init__(self, found: int) -> None:
        self.found = found
        super().__init__(f"checkpoint format {found} is newer than this kubetron reads ({FORMAT})")


def read_step_meta(directory: Path) -> StepMeta:
    """Parse `kubetron.json`; raises `NewerFormat`, or `ValueError` for a broken file."""
    path = directory / META_FILE
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{META_FILE} is not valid JSON: {err}") from None
    found = raw.get("format") if isinstance(raw, dict) else None
    if not isinstance(found, int) or found < 1:
        raise ValueError(f"{META_FILE} has no format version (a positive integer)")
    if found > FORMAT:
        raise NewerFormat(found)
    try:
        return StepMeta.from_json(raw)
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{META_FILE} misses or mistypes a field: {err!r}") from None


@dataclass(frozen=True)
class StepStatus:
    """What the files of one step directory say."""

    step: int
    path: Path
    complete: bool  # every rank's shards and both metadata files were written
    problem: str | None = None  # why it is incomplete, unreadable or not loadable here
    meta: StepMeta | None = None
    legacy: bool = False  # Megatron's files, no kubetron.json: written before format 1
    newer_format: int | None = None


def step_status(root: Path, step: int) -> StepStatus:
    directory = step_dir(root, step)
    if not directory.is_dir():
        return StepStatus(step, directory, False, f"{directory.name}/ does not exist")
    missing = [name for name in MEGATRON_FILES if not (directory / name).is_file()]
    has_meta = (directory / META_FILE).is_file()
    if not has_meta:
        if not missing:
            return StepStatus(step, directory, True, legacy=True)
        return StepStatus(
            step, directory, False,
            f"no {META_FILE} and no {', '.join(missing)}: the save did not finish",
        )  # fmt: skip
    try:
        meta = read_step_meta(directory)
    except NewerFormat as err:
        return StepStatus(step, directory, not missing, str(err), newer_format=err.found)
    except (OSError, ValueError) as err:
        return StepStatus(step, directory, False, str(err))
    if missing:
        return StepStatus(step, directory, False, f"{', '.join(missing)} missing", meta)
    if meta.step != step:
        return StepStatus(step, directory, False, f"{META_FILE} says step {meta.step}", meta)
    return StepStatus(step, directory, True, None, meta)


def list_steps(root: Path) -> list[StepStatus]:
    """Every `iter_*` directory under `root`, oldest first."""
    if not root.is_dir():
        return []
    steps = sorted(
        s for p in root.iterdir() if p.is_dir() and (s := parse_step_dir(p.name)) is not None
    )
    return [step_status(root, s) for s in steps]


@dataclass(frozen=True)
class RunIdentity:
    """What a run records in, and checks against, a checkpoint's `kubetron.json`."""

    model: ModelId
    shape: ParallelDims
    seed: int
    global_batch_size: int
    attempt: Attempt | None = None
    peft: PeftId | None = None

    @classmethod
    def from_config(
        cls, cfg: Any, dims: ParallelDims, padded_vocab_size: int, attempt: Attempt | None = None
    ) -> RunIdentity:
        """From a `config.TrainerConfig` and its `dims.ParallelDims`."""
        return cls(
            ModelId.from_config(cfg, padded_vocab_size),
            dims,
            cfg.recipe.seed,
            cfg.recipe.global_batch_size,
            attempt,
            PeftId.from_config(cfg),
        )

    def step_meta(self, step: int, consumed_samples: int) -> StepMeta:
        number = self.attempt.number if self.attempt else 0
        return StepMeta(
            step, consumed_samples, self.global_batch_size, self.model, self.shape, self.seed,
            attempt=number, peft=self.peft,
        )  # fmt: skip


@dataclass(frozen=True)
class ResumePlan:
    """How to resume: from which step and sample, and whether the RNG states fit this shape."""

    step: int
    source: Path
    consumed_samples: int
    restore_rng: bool
    saved: StepMeta | None  # None for a legacy checkpoint
    why: str  # one line for the log: what is restored, what re-seeded


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(w.title() for w in rest)


def plan_resume(root: Path, run: RunIdentity) -> ResumePlan | None:
    """The checkpoint to resume from (None: there is none, start at step 0), after refusing what
    cannot work: a `latest` that is unreadable or points to an incomplete save, a newer format,
    another architecture or padded vocabulary. Reads files only; raises `ConfigError`."""
    step = read_latest(root)
    if step is None:
        return None
    status = step_status(root, step)
    where = f"{root}/{LATEST} points to step {step}"
    if status.newer_format is not None:
        raise ConfigError(
            "checkpoint.path",
            f"{status.path} was written by a newer kubetron (checkpoint format "
            f"{status.newer_format}; this trainer reads formats up to {FORMAT}); nothing was "
            "loaded or changed. Run the trainer image that wrote it (or a newer one), or set "
            "checkpoint.path to another directory",
        )
    if not status.complete:
        complete = [s.step for s in list_steps(root) if s.complete and s.newer_format is None]
        hint = (
            f"complete steps: {', '.join(map(str, complete))}" if complete else "none is complete"
        )
        raise ConfigError(
            "checkpoint.path",
            f"{where}, but that save is incomplete ({status.problem}); nothing was loaded or "
            f"changed. Write the step of a complete checkpoint into {LATEST} ({hint}; "
            f"`kubetron checkpoints {root}` lists them) or remove {LATEST} to start from step 0",
        )
    meta = status.meta
    if meta is None:  # legacy: Megatron's files only, nothing to compare
        return ResumePlan(
            step, status.path, step * run.global_batch_size, False, None,
            f"{status.path.name} has no {META_FILE} (written before checkpoint format 1): model "
            "and shape unchecked; RNG re-seeded; data continues from step x globalBatchSize",
        )  # fmt: skip
    _check_model(status.path, meta.model, run.model)
    check_peft(status.path, meta.peft, run.peft)
    same = meta.shape == run.shape
    why = (
        f"written by {describe_shape(meta.shape)}, resumed as {describe_shape(run.shape)}: "
        + ("RNG states restored" if same else "RNG re-seeded (shape changed)")
        + f"; data continues at sample {meta.consumed_samples}"
    )
    return ResumePlan(step, status.path, meta.consumed_samples, same, meta, why)


def arch_differences(saved: dict[str, Any], current: dict[str, Any], mine: str) -> list[str]:
    """`key: checkpoint X, <mine> Y` for each architecture field (camelCase) that differs."""
    return [
        f"{key}: checkpoint {saved[key]!r}, {mine} {current[key]!r}"
        for key in current
        if key in saved and saved[key] != current[key]
    ]


def _check_model(source: Path, saved: ModelId, current: ModelId) -> None:
    diffs = arch_differences(saved.arch, current.arch, "this job")
    if diffs:
        raise ConfigError(
            "model",
            f"{source} holds another architecture, {saved.describe()}, than this job's "
            f"{current.describe()} ({'; '.join(diffs)}); nothing was loaded or changed. Resume "
            "with the model the checkpoint was written with (spec.model), or set "
            "checkpoint.path to a new directory to start from scratch",
        )
    if saved.padded_vocab_size != current.padded_vocab_size:
        raise ConfigError(
            "parallelism.tensor",
            f"{source} pads the vocabulary ({current.arch.get('vocabSize')}) to "
            f"{saved.padded_vocab_size} rows, this job to {current.padded_vocab_size}: Megatron "
            "pads it to a multiple of 128 x tensor, so the embedding and output layer would not "
            "fit; nothing was loaded or changed. Resume with a tensor degree that pads it to "
            f"{saved.padded_vocab_size} (as the one it was written with)",
        )


def check_peft(source: Path, saved: PeftId | None, current: PeftId | None) -> None:
    """Refuse to resume LoRA adapters into a run without them (or the reverse), with other
    adapter settings, or on base weights other than those they were trained on."""
    untouched = "nothing was loaded or changed"
    if current is not None and saved is None:
        raise ConfigError(
            "recipe.peft",
            f"{source} holds a full model, not LoRA adapters; {untouched}. Remove recipe.peft "
            "to resume it, or set checkpoint.path to a new directory for the adapters",
        )
    if saved is not None and current is None:
        raise ConfigError(
            "recipe.peft",
            f"{source} holds LoRA adapters only ({saved.settings}); {untouched}. Set "
            "recipe.peft as it was written with, or export the merged model "
            "(kubetron-export --merged) and fine-tune all of it from there",
        )
    if saved is None or current is None:
        return
    if saved.settings != current.settings:
        raise ConfigError(
            "recipe.peft",
            f"{source} holds adapters of {saved.settings}, this job asks for "
            f"{current.settings}; {untouched}. Resume with the recipe.peft it was written with, "
            "or set checkpoint.path to a new directory",
        )
    if saved.fingerprint != current.fingerprint:
        raise ConfigError(
            "model.weights",
            f"{source} holds LoRA adapters trained on the base weights {saved.base}; "
            f"{current.base} holds other weights (fingerprint {current.fingerprint[:12]}, the "
            f"adapters' base {saved.fingerprint[:12]}); {untouched}. Set spec.model.weights to "
            "the base the adapters were trained on",
        )


# --------------------------------------------------------------------------- several models
# A job of several models keeps one directory per trainable model, `<checkpoint.path>/<name>/`,
# each with the layout above; a frozen model is its weights and is never saved. A model's
# weights may name such a directory: its `latest` step is what the model starts from.


def is_checkpoint_dir(root: Path) -> bool:
    """Whether `root` holds one model's checkpoints: a `latest` file or a step directory."""
    if (root / LATEST).is_file():
        return True
    return root.is_dir() and any(
        p.is_dir() and parse_step_dir(p.name) is not None for p in root.iterdir()
    )


def model_dirs(root: Path) -> dict[str, Path]:
    """The models of a multi-model job's checkpoint directory (name -> its directory, sorted by
    name); empty for one model's directory or anything else."""
    if not root.is_dir() or is_checkpoint_dir(root):
        return {}
    return {p.name: p for p in sorted(root.iterdir()) if p.is_dir() and is_checkpoint_dir(p)}


def pick_model_dir(root: Path, name: str | None, option: str) -> Path:
    """`root` itself, or `root/<name>` of a multi-model job's directory. A multi-model directory
    without a name, or a name it does not hold, is refused (ConfigError naming `option`)."""
    models = model_dirs(root)
    listed = ", ".join(models)
    if name is None and models:
        raise ConfigError(
            option,
            f"{root} holds the checkpoints of several models ({listed}); pick one: pass "
            f"{option} {next(iter(models))}",
        )
    if name is None:
        return root
    if name not in models:
        held = (
            f"its models: {listed}"
            if models
            else f"it is one model's checkpoint directory; leave {option} out"
        )
        raise ConfigError(option, f"{root} has no model {name!r} ({held})")
    return models[name]


def weights_step(root: Path, field: str) -> StepMeta:
    """What a kubetron checkpoint directory named as a model's weights holds: the step `latest`
    points to, which must be complete and carry its `kubetron.json` (the model it was written
    with). Reads files only; anything else is refused (ConfigError naming `field`)."""

    def refuse(why: str) -> ConfigError:
        return ConfigError(
            field,
            f"{root} is a kubetron checkpoint directory, but {why}; a model starts from the "
            f"complete step its {LATEST} names. Write the step of a complete save into "
            f"{root}/{LATEST} (`kubetron checkpoints {root}` lists them) or name another "
            "directory (a Hugging Face checkpoint or a kubetron checkpoint)",
        )

    try:
        step = read_latest(root)
    except ConfigError:
        raise refuse(f"its {LATEST} holds no step number") from None
    if step is None:
        raise refuse(f"it has no {LATEST} (no save of it finished)")
    status = step_status(root, step)
    if status.newer_format is not None:
        raise refuse(f"step {step} was written by a newer kubetron ({status.problem})")
    if not status.complete:
        raise refuse(f"{LATEST} points to step {step}, an incomplete save ({status.problem})")
    if status.meta is None:
        raise refuse(
            f"step {step} has no {META_FILE} (written before checkpoint format 1): its model "
            "is unknown"
        )
    return status.meta
