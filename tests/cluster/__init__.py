"""Tests against a real Kubernetes control plane started by tests/cluster/harness.py."""
