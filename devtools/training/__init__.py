"""Training runs on this host for the tests and the benchmarks.

- launch.py          one `python -m kubetron_trainer` process per rank (torchrun's variables set
                     directly, so each rank's exit code and signals stay visible)
- pg_oracle.py       a torchrun worker that builds process groups both ways (kubetron's and
                     Megatron's parallel_state) and records what each rank saw
- gpu.py and the modules beside it: the runs on 2 GPUs that tests/gpu checks and the
  benchmarks time (trainer shapes, checkpoint resharding, sequence parallelism, 8B checkpoints)
"""

from pathlib import Path

# Run as a script under torchrun: `torchrun --nproc-per-node=N PG_ORACLE MODES OUT_DIR [STRIDE]`.
PG_ORACLE = Path(__file__).with_name("pg_oracle.py")
