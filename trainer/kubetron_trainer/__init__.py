"""kubetron trainer: Megatron-Core training with decentralized process groups."""

import pathlib
import sys

# Torch DCP pickles the checkpoint directory (a pathlib.Path) into each checkpoint's .metadata.
# Python 3.13 pickles it as `pathlib._local.PosixPath`, a module older Pythons lack, so a
# checkpoint written by a 3.13 trainer image would not load in 3.12 (kubetron-export on a
# workstation, a 3.12 NGC image). The alias lets any of them read it; checkpoint.py also writes
# the directory as a string.
if sys.version_info < (3, 13):
    sys.modules.setdefault("pathlib._local", pathlib)
