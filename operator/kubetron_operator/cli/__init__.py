"""The `kubetron` command and the generators behind `make generate` (CRD, RBAC, README reference).

Beside the operator's runtime, never imported by it: the runtime modules of `kubetron_operator`
reconcile jobs; this package writes files and answers a user at a terminal.
"""

from kubetron_operator.cli.main import main

__all__ = ["main"]
