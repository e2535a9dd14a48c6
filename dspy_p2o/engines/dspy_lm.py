"""Any dspy_p2o Engine as a `dspy.LM`, through DSPy 3.4's custom-engine hook.

DSPy calls `complete(request)` once per sample, often from many threads at once (GEPA
and Evaluate run threaded). Calls that arrive together are coalesced into one batched
`Engine.generate`, so a threaded evaluation decodes its prompts side by side instead of
one at a time behind a lock.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from typing import Any

import dspy
from dspy.lm15 import Message, Request, Response, Usage

from dspy_p2o.engines.base import Completion, Engine, SamplingParams


def request_messages(request: Request) -> list[dict[str, str]]:
    """The OpenAI-style messages of a DSPy request (system first)."""
    messages = []
    if request.system is not None:
        system = request.system if isinstance(request.system, str) else "".join(p.text for p in request.system)
        messages.append({"role": "system", "content": system})
    messages.extend({"role": m.role, "content": m.text or ""} for m in request.messages)
    return messages


class _Coalescer:
    """Runs concurrent single-sample requests with equal sampling params as one batch."""

    def __init__(self, engine: Engine, window_s: float, max_batch: int) -> None:
        self.engine, self.window_s, self.max_batch = engine, window_s, max_batch
        self._pending: list[tuple[list[int], SamplingParams, Future]] = []
        self._cond = threading.Condition()
        self._worker: threading.Thread | None = None

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> Completion:
        future: Future = Future()
        with self._cond:
            self._pending.append((prompt_ids, params, future))
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(target=self._run, name="dspy-p2o-lm", daemon=True)
                self._worker.start()
            self._cond.notify()
        return future.result()

    def _take_batch(self) -> list[tuple[list[int], SamplingParams, Future]]:
        with self._cond:
            if not self._cond.wait_for(lambda: self._pending, timeout=1.0):
                return []
        time.sleep(self.window_s)  # let the other threads' calls of this round arrive
        with self._cond:
            params = self._pending[0][1]
            batch = [item for item in self._pending if item[1] == params][: self.max_batch]
            for item in batch:
                self._pending.remove(item)
        return batch

    def _run(self) -> None:
        idle_rounds = 0
        while idle_rounds < 5:  # exit when idle; submit() restarts it
            batch = self._take_batch()
            if not batch:
                idle_rounds += 1
                continue
            idle_rounds = 0
            params = batch[0][1]
            try:
                outs = self.engine.generate(
                    [ids for ids, _, _ in batch], n=1, temperature=params.temperature, top_p=params.top_p,
                    top_k=params.top_k, max_tokens=params.max_tokens, stop=params.stop, seed=params.seed,
                )
                for (_, _, future), out in zip(batch, outs):
                    future.set_result(out.completions[0])
            except BaseException as exc:  # hand the failure to every waiting caller
                for _, _, future in batch:
                    future.set_exception(exc)


class EngineLMBackend:
    """The `engine=` object DSPy's LM calls: request -> chat template -> Engine.generate -> Response."""

    def __init__(self, engine: Engine, *, coalesce_window_s: float = 0.005, max_batch: int = 64) -> None:
        self.engine = engine
        self._coalescer = _Coalescer(engine, coalesce_window_s, max_batch)

    def complete(self, request: Request) -> Response:
        cfg = request.config
        params = SamplingParams(
            temperature=1.0 if cfg.temperature is None else float(cfg.temperature),
            top_p=1.0 if cfg.top_p is None else float(cfg.top_p),
            top_k=0 if cfg.top_k is None else int(cfg.top_k),
            max_tokens=int(cfg.max_tokens or 512),
            stop=tuple(cfg.stop or ()),
            seed=cfg.seed,
        )
        prompt_ids = self.engine.chat_prompt_ids(request_messages(request))
        completion = self._coalescer.submit(prompt_ids, params)
        usage = Usage(input_tokens=len(prompt_ids), output_tokens=len(completion.token_ids),
                      total_tokens=len(prompt_ids) + len(completion.token_ids))
        return Response(id=None, model=request.model, message=Message.assistant(completion.text),
                        finish_reason="length" if completion.finish_reason == "length" else "stop", usage=usage)

    def stream(self, request: Request):
        from dspy.lm15 import response_to_events

        return response_to_events(self.complete(request))

    def close(self) -> None:
        pass


def engine_lm(engine: Engine, *, temperature: float = 1.0, max_tokens: int = 512, **kwargs: Any) -> dspy.LM:
    """A cache-free `dspy.LM` served by `engine` (the policy changes as it trains)."""
    return dspy.LM(f"local/{engine.name}", engine=EngineLMBackend(engine), cache=False,
                   temperature=temperature, max_tokens=max_tokens, **kwargs)
