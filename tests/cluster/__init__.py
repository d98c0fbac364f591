"""Tests against a real Kubernetes control plane started by devtools/cluster/ (control_plane.py)."""
