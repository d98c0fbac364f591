"""Files a trainer reads from a volume: why one cannot be read, said so that a user can fix it.

A Hugging Face checkpoint saved by root (safetensors writes its files mode 0600) is invisible to
the trainer image's non-root user; opening it later fails with a message that names neither the
user nor the mode. The trainer checks before it joins the job instead. Torch-free.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path


def unreadable(path: Path) -> str | None:
    """None when this process can read `path`, else what is wrong and how to fix it."""
    if os.access(path, os.R_OK):
        return None
    try:
        st = path.stat()
    except OSError as err:
        return f"{path} cannot be read: {err.strerror}"
    return (
        f"{path} cannot be read by this process (uid {os.getuid()}, gid {os.getgid()}): the file "
        f"is mode {stat.filemode(st.st_mode)}, owner uid {st.st_uid} gid {st.st_gid}; make it "
        "readable for the trainer's user (chmod -R a+rX on the directory, or run the pods "
        "as its owner with spec.resources.podSecurityContext)"
    )
