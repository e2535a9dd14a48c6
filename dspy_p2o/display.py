"""What a run prints: one live line per phase, the summary lines, and nothing else unless verbose.

- A phase's live line (`live`): phase 1's batches of an epoch with the reward and the
  optimiser step, the prompt phase's metric calls of its GEPA budget (`GEPAProgress`), the toy
  world's pretraining, an evaluation's problems with its samples and tokens per second while
  a problem decodes (`DecodeProgress`). It disappears when the phase ends.
- Summary lines (`line`): one per epoch, written above any live line (logged when not shown).
- Everything else -- the engines' generate bars, the reward scoring bars, DSPy's evaluation
  bars, gepa's own bar, transformers' load/save bars, DSPy's and GEPA's info logging -- only
  with `set_verbose(True)` (`--verbose`). Warnings and errors are always shown.

`P2OConfig.progress` (`--quiet` sets it false) switches the live and summary lines off;
verbosity is a property of the process, like a logging level, set by the command line.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import time
from typing import Any, Callable, Iterator

log = logging.getLogger("dspy_p2o")

_VERBOSE = False


def set_verbose(on: bool) -> None:
    """Show the inner bars and the libraries' info logging (`--verbose`)."""
    global _VERBOSE
    _VERBOSE = bool(on)


def verbose() -> bool:
    return _VERBOSE


def add_arguments(parser: Any) -> None:
    """`--quiet` / `--verbose` of a command line that runs the loop."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quiet", action="store_true", help="no live lines and no summary lines (warnings and errors only)")
    group.add_argument("--verbose", action="store_true",
                       help="also the inner progress bars and DSPy's, GEPA's and dspy_p2o's info logging")


def configure(*, verbose: bool = False) -> None:
    """For a command line that owns its process: the verbosity, and the libraries' logging and
    bars for the whole process (also outside the loop: loading models, the toy world's base policy)."""
    import dspy  # noqa: F401  (importing DSPy sets its logger to INFO: the level is set after it)

    set_verbose(verbose)
    level = logging.INFO if verbose else logging.WARNING
    logging.getLogger("dspy").setLevel(level)
    if verbose:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        logging.getLogger("dspy_p2o").setLevel(logging.INFO)
    else:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def live(total: int | None, *, desc: str, unit: str, enabled: bool, initial: int = 0):
    """A phase's one live line (a tqdm bar that leaves nothing behind when closed)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=False, disable=not enabled,
                dynamic_ncols=True)


def line(text: str, enabled: bool) -> None:
    """A summary line: printed above any live line when `enabled`, else logged (at info)."""
    from tqdm.auto import tqdm

    if enabled:
        tqdm.write(text)
    else:
        log.info(text)


class GEPAProgress:
    """The prompt phase's live line, as a gepa callback (`gepa.optimize(callbacks=[...])`):
    metric calls used of the budget (calls spent outside GEPA, scoring fewshot candidates, count
    through `advance`), the best mean score on hard_dev so far, and what `spend()` reports (the
    student's and the reflection LM's tokens, the teacher's bill)."""

    def __init__(self, budget: int, *, desc: str, enabled: bool,
                 spend: Callable[[], dict[str, str]] | None = None) -> None:
        self.bar = live(budget, desc=desc, unit="call", enabled=enabled)
        self.best = 0.0
        self.spend = spend
        self.offset = 0  # metric calls spent outside GEPA

    def _draw(self, used: int) -> None:
        self.bar.n = min(int(used), self.bar.total or int(used))
        self.bar.set_postfix({"best": f"{self.best:.3f}", **(self.spend() if self.spend else {})})

    def advance(self, calls: int, best: float | None = None) -> None:
        self.offset += calls
        if best is not None:
            self.best = max(self.best, best)
        self._draw(self.offset)

    def on_budget_updated(self, event: dict[str, Any]) -> None:
        self._draw(self.offset + int(event["metric_calls_used"]))

    def on_valset_evaluated(self, event: dict[str, Any]) -> None:
        self.best = max(self.best, float(event.get("average_score") or 0.0))
        self._draw(self.bar.n)

    def close(self) -> None:
        self.bar.close()


class DecodeProgress:
    """An evaluation's live line: problems done of the benchmark, samples done, tokens per second.

    While `active()`, an engine that decodes step by step (the local engine) reports every step
    through `decoded`, so the line moves while a problem is still decoding; when an engine call
    returns, `settle` sets the exact counts (also for an engine that reports no steps: vLLM's)."""

    REFRESH_S = 0.5  # the line is redrawn at most this often while decoding

    def __init__(self, problems: int, *, done: int, samples: int, desc: str, enabled: bool) -> None:
        self.bar = live(problems, initial=done, desc=desc, unit="problem", enabled=enabled)
        self.samples_total, self.samples, self.tokens = samples, 0, 0
        self.start = self._drawn = time.perf_counter()
        self._postfix()

    @contextlib.contextmanager
    def active(self) -> Iterator["DecodeProgress"]:
        token = _DECODING.set(self)
        try:
            yield self
        finally:
            _DECODING.reset(token)

    def step(self, tokens: int, finished: int) -> None:
        self.tokens += tokens
        self.samples += finished
        if time.perf_counter() - self._drawn >= self.REFRESH_S:
            self._postfix()

    def settle(self, tokens: int, samples: int) -> None:
        """The exact totals so far (an engine call returned)."""
        self.tokens, self.samples = tokens, samples
        self._postfix()

    def problems_done(self, n: int) -> None:
        self.bar.update(n)
        self._postfix()

    def tokens_per_s(self) -> float:
        return self.tokens / max(time.perf_counter() - self.start, 1e-9)

    def _postfix(self) -> None:
        self._drawn = time.perf_counter()
        self.bar.set_postfix_str(f"samples {self.samples}/{self.samples_total}, {self.tokens_per_s():.1f} tok/s")

    def close(self) -> None:
        self.bar.close()


_DECODING: contextvars.ContextVar["DecodeProgress | None"] = contextvars.ContextVar("dspy_p2o_decoding", default=None)


def decoding() -> bool:
    """Whether a live line wants each decode step reported (`decoded`)."""
    return _DECODING.get() is not None


def decoded(tokens: int, finished: int) -> None:
    """An engine's decode step: `tokens` sampled, `finished` samples completed."""
    progress = _DECODING.get()
    if progress is not None:
        progress.step(tokens, finished)


class NoBar:
    """Stands in for `tqdm.tqdm` where a library hard-codes its bar: takes every call, draws nothing,
    and -- unlike a disabled tqdm -- never touches tqdm's process-wide instance set, which DSPy's
    parallelizer clears from other threads (a disabled tqdm created meanwhile raised KeyError)."""

    disable = True
    _instances: set = set()  # always empty: DSPy's parallelizer calls tqdm.tqdm._instances.clear()

    def __init__(self, iterable: Any = None, *args: Any, **kwargs: Any) -> None:
        self.iterable, self.total, self.n = iterable, kwargs.get("total"), kwargs.get("initial", 0)

    def __iter__(self) -> Iterator[Any]:
        return iter(self.iterable if self.iterable is not None else ())

    def __enter__(self) -> "NoBar":
        return self

    def __exit__(self, *exc: Any) -> bool:
        return False

    def update(self, n: float = 1) -> None:
        self.n += n

    def __getattr__(self, name: str) -> Any:  # set_description, set_postfix, refresh, close, write, ...
        return lambda *args, **kwargs: None


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """Unless verbose: no bars and no info logging from DSPy, gepa and transformers inside the
    loop (restored when it ends). dspy.GEPA hard-codes `display_progress_bar=True` in its call to
    gepa.optimize (passing it again in gepa_kwargs is a duplicate keyword), and DSPy's
    bootstrap_trace_data hard-codes `display_progress=True`: their bars are switched off by
    replacing, for the duration, the tqdm class those two modules hold with `NoBar` -- the
    prompt phase shows its progress as its own live line (`GEPAProgress`).
    DSPy's per-example parse errors during GEPA (scored as failures) are hidden likewise."""
    if _VERBOSE:
        yield
        return
    import dspy.utils.parallelizer as dspy_parallel
    import gepa.core.engine as gepa_engine
    from transformers.utils import logging as hf_logging

    class SilentModule:  # what dspy.utils.parallelizer uses of the tqdm module: tqdm.tqdm
        tqdm = NoBar

    # (module, name, stand-in); a name a later release no longer has is left alone: its bar shows, nothing breaks
    patches = [(m, name, new) for m, name, new in ((gepa_engine, "tqdm", NoBar), (dspy_parallel, "tqdm", SilentModule))
               if hasattr(m, name)]
    saved = [getattr(m, name) for m, name, _ in patches]
    levels = {"dspy": logging.WARNING, "dspy.utils.parallelizer": logging.CRITICAL}
    saved_levels = {name: logging.getLogger(name).level for name in levels}
    bars_on = hf_logging.is_progress_bar_enabled()
    for m, name, new in patches:
        setattr(m, name, new)
    hf_logging.disable_progress_bar()
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)
    try:
        yield
    finally:
        for (m, name, _), old in zip(patches, saved):
            setattr(m, name, old)
        if bars_on:
            hf_logging.enable_progress_bar()
        for name, level in saved_levels.items():
            logging.getLogger(name).setLevel(level)
