"""File stamps: how the proxy notices that a file it read has changed on disk.

``os.stat`` follows symlinks, so a Kubernetes ConfigMap or Secret volume update (an
atomic swap of the ``..data`` symlink) shows as a new stamp, as does an in-place write.
"""

from __future__ import annotations

import os

Stamp = tuple[int, int, int, int]


def stamp(path: str) -> Stamp | None:
    """(device, inode, size, mtime_ns) of ``path``, or None when it cannot be read."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
