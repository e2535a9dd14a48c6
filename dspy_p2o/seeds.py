"""Every seed of a run comes from its one `seed` knob through `derive_seed` (a leaf module).

A random stream is named by where it is used ("rollouts", epoch, batch, rank ...), and its
seed is a hash of the run's seed and that name: streams never collide by arithmetic accident
(seed + epoch of one stream equal to seed + 1 of another), and a new stream needs no new
formula.
"""

from __future__ import annotations

import hashlib

__all__ = ["derive_seed"]


def derive_seed(seed: int, *scope: str | int) -> int:
    """A 31-bit seed for the stream `scope` of a run seeded with `seed` (deterministic across
    machines and Python versions: sha256, not `hash`)."""
    text = "/".join([str(int(seed)), *(str(part) for part in scope)])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "big") & 0x7FFFFFFF
