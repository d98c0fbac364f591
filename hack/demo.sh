#!/usr/bin/env bash
# make demo: a real local training run of the CPU example, as a pod would run it.
#
# Renders manifests/examples/gpt-tiny-cpu.yaml with the kubetron CLI (the ConfigMap JSON the
# operator would create), points its data at an indexed dataset built here from generated text
# (byte tokenizer, no download) and its checkpoints at a temporary directory, then starts
# torchrun with 4 CPU processes (gloo, TP2 x DP2) exactly as the pod command does, and prints a
# summary. Needs only `make setup`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
export PYTHONPATH="$PWD/trainer:$PWD/operator" OMP_NUM_THREADS=1 PYTHONWARNINGS=ignore
work=$(mktemp -d "${TMPDIR:-/tmp}/kubetron-demo.XXXXXX")
trap 'rm -rf "$work"' EXIT
export PROMETHEUS_MULTIPROC_DIR="$work/metrics"
start=$(date +%s)

echo "==> generating text and building an indexed dataset (byte tokenizer)"
"$PY" - "$work/text.txt" <<'PYEOF'
import random, sys
rng = random.Random(0)
nouns = ["cluster", "operator", "trainer", "pod", "node", "model", "gradient", "checkpoint"]
verbs = ["schedules", "restarts", "watches", "shards", "saves", "reads", "scales", "reduces"]
adjs = ["small", "busy", "quiet", "elastic", "patient", "careful", "fast", "sharded"]
def sentence():
    return (f"The {rng.choice(adjs)} {rng.choice(nouns)} {rng.choice(verbs)} "
            f"the {rng.choice(adjs)} {rng.choice(nouns)}.")
paragraphs = [" ".join(sentence() for _ in range(6)) for _ in range(400)]
open(sys.argv[1], "w").write("\n\n".join(paragraphs))
PYEOF
"$PY" -m kubetron_trainer.tokenize --input "$work/text.txt" --output-prefix "$work/data/text"

echo "==> rendering manifests/examples/gpt-tiny-cpu.yaml (ConfigMap config.json)"
.venv/bin/kubetron render manifests/examples/gpt-tiny-cpu.yaml > "$work/rendered.yaml"
"$PY" - "$work" <<'PYEOF'
import json, socket, sys, yaml
work = sys.argv[1]
docs = list(yaml.safe_load_all(open(f"{work}/rendered.yaml")))
cm = next(d for d in docs if d["kind"] == "ConfigMap")
cfg = json.loads(cm["data"]["config.json"])
cfg["data"] = {**cfg["data"], "type": "indexed", "paths": [{"prefix": f"{work}/data/text"}]}
cfg["checkpoint"]["path"] = f"{work}/checkpoints"
with socket.socket() as s:  # a free port, so the demo never clashes with a running trainer
    s.bind(("127.0.0.1", 0))
    cfg["metrics"]["port"] = s.getsockname()[1]
json.dump(cfg, open(f"{work}/config.json", "w"), indent=1)
r = cfg["recipe"]
print(f"    {cfg['preset']}: {r['trainIters']} steps, global batch {r['globalBatchSize']}, "
      f"seq {r['seqLength']}, tensor={cfg['parallelism']['tensor']}, world={cfg['worldSize']}")
PYEOF

echo "==> torchrun --nproc-per-node 4 -m kubetron_trainer (gloo on CPU)"
.venv/bin/torchrun --standalone --nproc-per-node 4 -m kubetron_trainer \
  --config "$work/config.json" --summary "$work/summary.json" 2>&1 \
  | grep --line-buffered -E "kubetron_trainer|exiting|Error|error" || true
test -f "$work/summary.json" || { echo "demo: training failed" >&2; exit 1; }

echo "==> summary"
"$PY" - "$work" "$start" <<'PYEOF'
import json, os, sys, time
work, start = sys.argv[1], int(sys.argv[2])
s = json.load(open(f"{work}/summary.json"))
steps = s["steps"]
ckpt = f"{work}/checkpoints"
print(f"    steps          {len(steps)} ({s['stopped_by']}), attention: {s['attention']}")
print(f"    loss           {steps[0]['loss']:.3f} -> {steps[-1]['loss']:.3f}")
print(f"    throughput     {s['tokens_per_s']:,.0f} tokens/s (4 CPU processes)")
print(f"    checkpoints    {sorted(os.listdir(ckpt))}, latest -> "
      f"{open(f'{ckpt}/latest').read().strip()}")
print(f"    wall time      {time.time() - start:.0f}s")
if steps[-1]["loss"] >= steps[0]["loss"]:
    sys.exit("demo: the loss did not fall")
PYEOF
