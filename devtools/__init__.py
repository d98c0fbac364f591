"""kubetron's development infrastructure: what the tests, the benchmarks and `make demo` share.

Not part of the product (the wheel ships api/, operator/ and trainer/ only); importable from the
repository root like `tests` and `benchmarks`, which import it and never each other.

- cluster/   a throw-away Kubernetes control plane from `make tools`' binaries, kwok's fake GPU
             nodes, an optional real worker node (containerd, kubelet), kubetron deployed on it
             with its chart, faults to inject; `python -m devtools.cluster up|down|status`
- demo.py    `make demo`: the CPU example trained through Kubernetes on that cluster
- training/  trainer processes on this host (gloo or one a GPU), the process-group oracle, and
             the multi-GPU runs that the GPU tests check and the benchmarks time
- ports.py   free loopback ports outside the ephemeral range
- hf_tokenizer.py  small Hugging Face tokenizers and corpora built on the fly
"""
