"""What the processes of a run exchange, and how long each waits for the others.

Under N processes (torchrun / accelerate launch) every rank runs the same loop on its share of
each batch; these are the loop's only meeting points besides DDP's gradient all-reduce. Time
spent blocked here is counted per process (`wait_s`, reset per epoch): `train/time_wait` and
`epoch/wait_frac/rankR` in the metrics. With one process every call returns at once.
"""

from __future__ import annotations

import time
from typing import Any


def shard(items: list[Any], index: int, count: int) -> list[Any]:
    """Process `index`'s contiguous share of `items` among `count` processes (sizes differ by at
    most one; the shares in rank order are `items`)."""
    return items[len(items) * index // count:len(items) * (index + 1) // count]


class Collectives:
    """Gathers and broadcasts over accelerate's process group, with wait accounting."""

    def __init__(self, accelerator: Any) -> None:
        self.accelerator = accelerator
        self.rank, self.size = accelerator.process_index, accelerator.num_processes
        self.is_main = accelerator.is_main_process
        self.wait_s = 0.0  # this process's seconds blocked waiting for the others since `start_epoch`
        self._epoch_start = time.perf_counter()

    def start_epoch(self) -> None:
        self.wait_s, self._epoch_start = 0.0, time.perf_counter()

    def share(self, items: list[Any]) -> list[Any]:
        """This process's contiguous share of `items`."""
        return shard(items, self.rank, self.size)

    def gather(self, items: list[Any]) -> list[Any]:
        """Every process's `items`, concatenated in rank order."""
        from accelerate.utils import gather_object

        return self._timed(gather_object, items)

    def from_main(self, value: Any) -> Any:
        """The main process's `value` on every process."""
        from accelerate.utils import broadcast_object_list

        return self._timed(broadcast_object_list, [value])[0]

    def barrier(self) -> None:
        self._timed(lambda _: self.accelerator.wait_for_everyone(), None)

    def wait_fractions(self) -> dict[str, float]:
        """Per process: the fraction of this epoch spent blocked waiting for the others (multi-process only)."""
        if self.size == 1:
            return {}
        elapsed = time.perf_counter() - self._epoch_start
        fractions = self.gather([self.wait_s / max(1e-9, elapsed)])
        return {f"wait_frac/rank{r}": f for r, f in enumerate(fractions)}

    def _timed(self, function: Any, argument: Any) -> Any:
        if self.size == 1:
            return function(argument) if argument is not None else None
        start = time.perf_counter()
        try:
            return function(argument)
        finally:
            self.wait_s += time.perf_counter() - start
