"""The contract between the kubetron operator and trainer: the MegatronJob API, the trainer
config, parallel degrees, shape rules, exit codes and checkpoint metadata. Torch-free and
Kubernetes-client-free: both programs import it, neither imports the other."""
