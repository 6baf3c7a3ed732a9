"""A test pattern that names each LBA, for write/read/verify."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt


def pattern(
    lba_size: int, first_lba: int, nblocks: int, seed: int = 0x5EED
) -> npt.NDArray[np.uint8]:
    """``nblocks`` LBAs of data in which every 8 bytes say which LBA they belong to (so a
    misplaced block shows) and differ with ``seed``."""
    per = lba_size // 8
    lbas = np.arange(first_lba, first_lba + nblocks, dtype=np.uint64)[:, None]
    words = np.arange(per, dtype=np.uint64)[None, :] ^ (lbas << np.uint64(32)) ^ np.uint64(seed)
    out: npt.NDArray[np.uint8] = words.reshape(-1).view(np.uint8)
    return out
