"""kubetron trainer: Megatron-Core training with decentralized process groups."""
