"""Running one trainer: rank environment, process groups, the loop, optimizer steps, checkpoints."""
