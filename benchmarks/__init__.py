"""kubetron's benchmarks, each a command run from the repository root (`--help` says more):

    python -m benchmarks.operator_latency       MegatronJob -> PyTorchJob latency (local cluster)
    python -m benchmarks.recovery               goodput through a killed trainer (real node)
    python -m benchmarks.prepare_data           data preparation throughput (CPU)
    python -m benchmarks.pg_setup               process-group setup time with gloo (CPU)
    python -m benchmarks.trainer_throughput     one GPU: baseline vs fast path, variants, profiles
    python -m benchmarks.kernels                one GPU: attention, wgrad, RMSNorm, SwiGLU kernels
    python -m benchmarks.fp8                    one Hopper GPU: fp8 against bf16, GEMMs and training
    python -m benchmarks.dpo_peers              one GPU: DPO, kubetron against TRL's DPOTrainer
    python -m benchmarks.lora_peers             one GPU: LoRA of an 8B model, kubetron against peft
    python -m benchmarks.decentralized_groups   2 GPUs: groups vs parallel_state, trainer shapes
    python -m benchmarks.sequence_parallel      2 GPUs: SP gradients and training against TP2
    python -m benchmarks.reshard                2 GPUs: checkpoints resumed across PP/VPP/EP
    python -m benchmarks.checkpoint_8b          2 GPUs: Qwen3-8B saves and loads, async saves
    python -m benchmarks.train_8b               2 GPUs: 8B models' MFU per shape and groups
    python -m benchmarks.profile_8b             2 GPUs: where an 8B step's time goes

Each writes its JSON with `--output` (results/ holds the recorded ones, named by what they
measure; RESULTS.md gives each row's machine, command and numbers). The runs the GPU tests also
check live in devtools/training.
"""
