"""Where Megatron-Core's index caches of indexed data go (data/batches.py `index_cache`): beside
the data, as Megatron puts them, while the data's directory can be written; under the checkpoint
path when the data sits on a read-only volume; a clear refusal naming the field when neither can
be written. The read-only cases run in a mount namespace of their own with the data's directory
bind-mounted read-only (root only), since a read-only mount is what refuses root a write."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from kubetron_api.config import TrainerConfig
from kubetron_api.parse import parse_job
from kubetron_operator.plan import plan
from kubetron_trainer.data.batches import INDEX_CACHE, build_data, index_cache
from kubetron_trainer.tools.indexed import IndexedWriter
from tests.builders import job_dict

# Build the training split in its own process: prints "built <the checkpoint cache's files>"
# or "refused <field>: <message>".
BUILD = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    import torch
    from kubetron_api.config import TrainerConfig
    from kubetron_api.exitcodes import ConfigError
    from kubetron_trainer.data.batches import INDEX_CACHE, build_data

    cfg = TrainerConfig.model_validate_json(Path(sys.argv[1]).read_text())
    try:
        build_data(cfg, reads_data=True, dp_rank=0, dp_size=1, device=torch.device("cpu"))
    except ConfigError as err:
        print("refused", err)
    else:
        ckpt = cfg.checkpoint.path
        cached = sorted(p.name for p in (Path(ckpt) / INDEX_CACHE).iterdir()) if ckpt else []
        print("built", " ".join(cached))
    """
)


def corpus(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    prefix = directory / "corpus"
    with IndexedWriter(prefix, 512) as out:
        out.add(np.repeat(np.arange(1, 51), 20), [20] * 50)
        out.commit()
    return prefix


def config(prefix: Path, checkpoint: Path | None) -> TrainerConfig:
    body = job_dict("gpt-tiny", seqLength=16, globalBatchSize=8, trainIters=3)
    body["spec"]["data"] = {"type": "indexed", "paths": [{"prefix": str(prefix)}],
                            "split": "80,20,0"}  # fmt: skip
    if checkpoint is not None:
        body["spec"]["checkpoint"] = {"path": str(checkpoint)}
    return plan(parse_job(body)).trainer_config


def test_writable_data_keeps_megatrons_own_cache_beside_it(tmp_path: Path) -> None:
    prefix = corpus(tmp_path / "data")
    cfg = config(prefix, tmp_path / "ckpt")
    assert index_cache(cfg) is None
    build_data(cfg, reads_data=True, dp_rank=0, dp_size=1, device=torch.device("cpu"))
    assert list((prefix / "cache" / "GPTDataset_indices").glob("*shuffle_index.npy"))
    assert not (tmp_path / "ckpt").exists()


def read_only_build(tmp_path: Path, data: Path, cfg: TrainerConfig) -> str:
    """BUILD run with `data` bind-mounted read-only in a mount namespace of its own."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("a read-only bind mount needs root and unshare")
    cfg_file = tmp_path / "config.json"
    cfg_file.write_text(cfg.model_dump_json())
    mount = f"mount --bind -o ro {data} {data}"
    cmd = ["unshare", "-m", "sh", "-c", f'{mount} && exec "$0" -c "$1" "$2"',
           sys.executable, BUILD, str(cfg_file)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if done.returncode != 0 and "mount" in done.stderr and "ermission" in done.stderr:
        pytest.skip(f"no bind mount here: {done.stderr.strip()}")
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip().splitlines()[-1]


def test_read_only_data_caches_its_indices_under_the_checkpoint_path(tmp_path: Path) -> None:
    data = tmp_path / "data"
    prefix = corpus(data)
    cfg = config(prefix, tmp_path / "ckpt")
    built, *files = read_only_build(tmp_path, data, cfg).split()
    assert built == "built", files
    for part in ("description.txt", "document_index.npy", "sample_index.npy", "shuffle_index.npy"):
        assert any(f.endswith(f"GPTDataset-train-{part}") for f in files), (part, files)
    assert not (prefix / "cache").exists() and (tmp_path / "ckpt" / INDEX_CACHE).is_dir()


def test_read_only_data_without_a_checkpoint_path_is_refused_naming_the_fix(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    cfg = config(corpus(data), None)
    out = read_only_build(tmp_path, data, cfg)
    assert out.startswith("refused config field data.paths[0].prefix:"), out
    assert f"{data} is read-only" in out
    assert "mount the data writable, or set checkpoint.path" in out
