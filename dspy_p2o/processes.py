"""Processes that must not outlive the process that started them (Linux: the kernel's parent-death signal)."""

from __future__ import annotations

import os
import signal
import sys


def die_with_parent(signum: int = signal.SIGKILL) -> bool:
    """Have the kernel send `signum` to this process when its parent exits (`PR_SET_PDEATHSIG`; Linux
    only: False elsewhere). It fires when the *thread* that forked this process exits, so the parent must
    start it from a thread that lives as long as itself (its main thread). In a child between fork and
    exec (`Popen(preexec_fn=...)`) it covers the program the child then runs."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signum)) == 0  # 1 = PR_SET_PDEATHSIG
    except Exception:
        return False


def die_with_launcher() -> None:
    """A rank of torchrun / accelerate launch dies when its launcher dies, however it dies.

    The launcher starts every rank in a session of its own, so a signal to the launcher's process group
    (`kill -9 -PGID`, a closed terminal) does not reach the ranks: without this they would run on,
    orphaned, holding the run directory's lock. SIGKILL, not SIGTERM: a rank left alone cannot finish
    any collective, and the run resumes from its last checkpoint. No-op outside such a launcher."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:  # set by torchrun's agent (accelerate launch runs it too)
        return
    if die_with_parent(signal.SIGKILL) and os.getppid() == 1:  # the launcher died before the signal was set
        os.kill(os.getpid(), signal.SIGKILL)


def end_process_group() -> None:
    """Close torch.distributed's process group at the end of a multi-process job (every process calls
    it): its communication threads are stopped and joined, not torn down mid-flight at interpreter
    exit, which can abort a process that has finished its work. No-op in a single process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
