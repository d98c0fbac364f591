"""kubetron operator: turns MegatronJobs into Kubeflow PyTorchJobs."""
