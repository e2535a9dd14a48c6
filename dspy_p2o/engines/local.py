"""The embedded engine: a transformers causal LM sampled in process (CPU or one GPU).

A hand-written sampling loop (rather than `model.generate`) so that the log-prob of
every sampled token under the *processed* distribution (temperature, top-k, top-p) is
exact -- these are the behaviour log-probs the trainer compares against -- and so that
the prompts of a call prefill the prefix they share once and the n samples of a prompt
its prefill, and a decode step reads the KV cache once per key/value head (`decode_sdpa`).
The engine may share the trainer's module: then syncing weights costs nothing. With a LoRA
policy (a peft module) `without_adapter()` is pi_init at no cost: the same module sampled with its
adapter disabled.
"""

from __future__ import annotations

import contextlib
import copy
import os
import threading
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import AttentionInterface
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from dspy_p2o import display
from dspy_p2o.config import LocalOptions
from dspy_p2o.engines.base import Completion, Engine, GenerationOutput, SamplingParams, SyncReport
from dspy_p2o.engines.hf import eos_token_ids, load_model_and_tokenizer, resolve_device, resolve_dtype
from dspy_p2o.renderer import check_chat_template


def process_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Log-probs of the sampling distribution: temperature, then top-k, then top-p (as vLLM orders them)."""
    logits = logits.float()
    if params.temperature == 0:
        return torch.log_softmax(logits, dim=-1)
    logits = logits / params.temperature
    if params.top_k and params.top_k > 0 and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # keep the smallest prefix whose mass reaches top_p (always at least the top token)
        drop_sorted = probs.cumsum(dim=-1) - probs >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return torch.log_softmax(logits, dim=-1)


class LocalEngine(Engine):
    """In-process transformers engine.

    Args:
        model: a local model dir / hub id, or an already loaded `PreTrainedModel`
            (e.g. the trainer's module, shared so that weight sync is free).
        tokenizer: required when `model` is a module.
        device, dtype, max_batch_size: `config.LocalOptions` (a run's `local` section).
    """

    def __init__(
        self,
        model: str | os.PathLike | torch.nn.Module,
        tokenizer: Any = None,
        *,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        max_batch_size: int = LocalOptions.max_batch_size,
        name: str | None = None,
    ) -> None:
        if isinstance(model, torch.nn.Module):
            if tokenizer is None:
                raise ValueError("LocalEngine(model=<module>) needs the tokenizer too")
            check_chat_template(tokenizer)
            self.model, self.tokenizer = model, tokenizer
            self.device = next(model.parameters()).device
        else:
            self.device = resolve_device(device)
            self.model, self.tokenizer = load_model_and_tokenizer(model, self.device, resolve_dtype(dtype, self.device))
        use_decode_attention(self.model)
        self.name = name or Path(str(getattr(self.model, "name_or_path", "") or "policy")).name or "policy"
        self.max_batch_size = max_batch_size
        self.context_length = getattr(self.model.config, "max_position_embeddings", None)  # prompt + completion
        self.eos_ids = eos_token_ids(self.tokenizer, getattr(self.model, "generation_config", None))
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(self.eos_ids)
        # One model, many threads (DSPy calls the LM from a thread pool): one forward at a time.
        self._lock = threading.RLock()
        self._adapter_disabled = False  # `without_adapter()`: sample the base weights of a LoRA module

    def without_adapter(self) -> "LocalEngine":
        """This engine sampling the base model of a LoRA policy: the same module run inside peft's
        `disable_adapter()` (pi_init, no second copy of the weights). It shares this engine's lock,
        so no call of either samples while the other has the adapter switched."""
        if not hasattr(self.model, "disable_adapter"):
            raise TypeError(f"{self.name!r} has no adapter to disable: it is not a peft (LoRA) model")
        view = copy.copy(self)
        view._adapter_disabled = True
        view.name = f"{self.name}-base"
        return view

    # ------------------------------------------------------------------ generation
    def _generate(self, prompts: list[list[int]], n: int, params: SamplingParams,
                  progress: bool) -> list[GenerationOutput]:
        outputs = [GenerationOutput(prompt_token_ids=p) for p in prompts]
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(params.seed)
        # Longest prompts first so a chunk wastes little on padding.
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        per_chunk = max(1, self.max_batch_size // n)
        chunks = [order[i:i + per_chunk] for i in range(0, len(order), per_chunk)]
        bar = tqdm(total=len(prompts), desc="generate", unit="prompt", leave=False, disable=not progress)
        with self._lock, self._inference_mode(), self._adapter_state():
            for chunk in chunks:
                done = self._sample_chunk([prompts[i] for i in chunk], n, params, generator)
                for i, completions in zip(chunk, done):
                    outputs[i].completions = completions
                bar.update(len(chunk))
        bar.close()
        return outputs

    @contextlib.contextmanager
    def _inference_mode(self):
        """Eval mode and no grad for sampling, restoring the trainer's state afterwards."""
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            self.model.train(was_training)

    def _adapter_state(self):
        """peft's disable_adapter() for a `without_adapter()` engine, else nothing (under the lock)."""
        return self.model.disable_adapter() if self._adapter_disabled else contextlib.nullcontext()

    def _sample_chunk(self, prompts: list[list[int]], n: int, params: SamplingParams, generator) -> list[list[Completion]]:
        cache = _kv_cache(self.model.config)
        logits, mask, positions = self._prefill(prompts, n, cache)
        return self._decode(logits, mask, positions, cache, n, params, generator)

    def _prefill(self, prompts: list[list[int]], n: int, cache: Cache) -> tuple[torch.Tensor, ...]:
        """Fill `cache` with every prompt, each n times (a row per sample, prompt by prompt).

        The prefix all prompts share (a program's instruction and demos: most of a batch's prompt
        tokens) is computed once and copied to every prompt's row; then the rest of each prompt,
        left-padded so that every prompt ends at the last column (the padding sits between the
        shared prefix and the prompt's own tokens, masked out); then the cache is fanned out to
        the n samples. Only the last position's logits are computed: the LM head over every
        prompt position (49k vocabulary) cost more than decoding. Returns those logits, the
        attention mask and each row's next position, one row per sample."""
        device = self.device
        shared = _shared_prefix(prompts)
        if shared:
            self.model(input_ids=torch.tensor([prompts[0][:shared]], device=device), past_key_values=cache,
                       use_cache=True, logits_to_keep=1)
            cache.batch_repeat_interleave(len(prompts))
        width = max(len(p) for p in prompts) - shared
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), shared + width), dtype=torch.long)
        mask[:, :shared] = 1
        for row, p in enumerate(prompts):
            own = p[shared:]
            ids[row, width - len(own):] = torch.tensor(own)
            mask[row, shared + width - len(own):] = 1
        ids, mask = ids.to(device), mask.to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions[:, shared:], past_key_values=cache,
                         use_cache=True, logits_to_keep=1)
        logits, next_pos = out.logits[:, -1, :], positions[:, -1:] + 1
        if n > 1:
            cache.batch_repeat_interleave(n)
            logits, mask, next_pos = (t.repeat_interleave(n, dim=0) for t in (logits, mask, next_pos))
        return logits, mask, next_pos

    def _decode(self, logits: torch.Tensor, mask: torch.Tensor, next_pos: torch.Tensor, cache: Cache, n: int,
                params: SamplingParams, generator) -> list[list[Completion]]:
        """Sample up to max_tokens per row from the prefilled `cache`: each step samples every batch
        row from its processed logits (`process_logits`), records the token and its log-prob, and
        feeds the tokens back. A row that ends (a stop token or string) is marked; ended rows leave
        the batch (and its KV cache) once they are a quarter of it, since removing them copies
        the whole cache: until then they are decoded and their tokens ignored."""
        device = self.device
        rows = logits.shape[0]
        stop_ids = torch.tensor(sorted(self.eos_ids | set(params.stop_token_ids)), device=device)
        tokens = torch.full((rows, params.max_tokens), self.pad_id, dtype=torch.long, device=device)
        logps = torch.zeros((rows, params.max_tokens), dtype=torch.float32, device=device)
        lengths = torch.full((rows,), params.max_tokens, dtype=torch.long, device=device)
        finished = torch.zeros(rows, dtype=torch.bool, device=device)
        live = torch.arange(rows, device=device)  # the output row of each batch row
        running = torch.ones(rows, dtype=torch.bool, device=device)  # batch rows still sampling
        for step in range(params.max_tokens):
            logprobs = process_logits(logits, params)
            if params.temperature == 0:
                token = logprobs.argmax(dim=-1)
            else:
                token = torch.multinomial(logprobs.exp(), 1, generator=generator).squeeze(-1)
            tokens[live, step] = token
            logps[live, step] = logprobs.gather(-1, token[:, None]).squeeze(-1)
            done = torch.isin(token, stop_ids) & running
            if params.stop:
                done |= self._hits_stop_string(tokens, live, step + 1, running & ~done, params.stop)
            ended = live[done]
            finished[ended], lengths[ended] = True, step + 1
            running &= ~done
            left = int(running.sum())
            if display.decoding():  # an evaluation's live line (samples done, tokens/s); all rows end at the limit
                sampled = left + int(done.sum())
                display.decoded(sampled, sampled if step + 1 == params.max_tokens else int(done.sum()))
            if not left or step + 1 == params.max_tokens:
                break
            if 4 * (len(live) - left) >= len(live):
                keep = running.nonzero().squeeze(-1)
                cache.batch_select_indices(keep)
                live, token, mask, next_pos, running = (t[keep] for t in (live, token, mask, next_pos, running))
            mask = torch.cat([mask, torch.ones((mask.shape[0], 1), dtype=mask.dtype, device=device)], dim=1)
            logits = self.model(input_ids=token[:, None], attention_mask=mask, position_ids=next_pos,
                                past_key_values=cache, use_cache=True).logits[:, -1, :]
            next_pos = next_pos + 1
        end = step + 1
        return self._collect(tokens[:, :end].tolist(), logps[:, :end].tolist(), lengths.tolist(), finished.tolist(), n,
                             params)

    def _hits_stop_string(self, tokens: torch.Tensor, live: torch.Tensor, length: int, check: torch.Tensor,
                          stops: tuple[str, ...]) -> torch.Tensor:
        """Which batch rows in `check` have just produced a stop string: each one's output row
        (`live`) decoded over its last few of `length` tokens."""
        tail_tokens = max(4, max(len(s) for s in stops))  # a token decodes to >= 1 character for these tokenizers
        hits = torch.zeros_like(check)
        for row in check.nonzero().flatten().tolist():
            tail = tokens[live[row], max(0, length - tail_tokens):length].tolist()
            if any(s in self.tokenizer.decode(tail, skip_special_tokens=False) for s in stops):
                hits[row] = True
        return hits

    def _collect(self, tokens, logps, lengths, finished, n, params) -> list[list[Completion]]:
        """Completions from the sampled rows (n per prompt): each row up to its end, the stop token kept
        (the trainer must learn to emit it), its text without stop tokens and cut at a stop string."""
        stop_set = self.eos_ids | set(params.stop_token_ids)
        results: list[list[Completion]] = []
        for row, (toks, lps, length, done) in enumerate(zip(tokens, logps, lengths, finished)):
            if row % n == 0:
                results.append([])
            toks, lps = toks[:length], lps[:length]
            text = self.tokenizer.decode([t for t in toks if t not in stop_set], skip_special_tokens=False)
            reason = "stop" if done else "length"
            if params.stop:
                text, toks, lps, cut = _cut_at_stop_string(text, toks, lps, params.stop, self.tokenizer)
                reason = "stop" if cut else reason
            results[-1].append(Completion(token_ids=toks, text=text, logprobs=lps, finish_reason=reason))
        return results

    # ------------------------------------------------------------------ weights
    def dspy_lm(self, **defaults: Any):
        """A `dspy.LM` on this engine (DSPy's custom-engine hook; concurrent calls are batched)."""
        from dspy_p2o.engines.dspy_lm import engine_lm

        return engine_lm(self, **defaults)

    def sync_weights(self, source: Any) -> SyncReport:
        """Serve new weights. A shared module needs nothing (0 s); otherwise copy a state dict or load
        a dir (an exact copy: there is no served log-prob to compare, logprob_diff is None)."""
        if source is self.model or source is None:
            return SyncReport()
        start = time.perf_counter()
        with self._lock:
            if isinstance(source, torch.nn.Module):
                state = source.state_dict()
            elif isinstance(source, dict):
                state = source
            else:
                from transformers import AutoModelForCausalLM

                path = Path(source)
                if not path.is_dir():
                    raise FileNotFoundError(f"cannot sync weights from {str(source)!r}: not a model directory")
                state = AutoModelForCausalLM.from_pretrained(str(path), dtype=next(self.model.parameters()).dtype).state_dict()
            missing, unexpected = self.model.load_state_dict(state, strict=False)
            if unexpected or [m for m in missing if "lm_head" not in m]:
                raise ValueError(f"weight sync mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
        return SyncReport(seconds=time.perf_counter() - start)

    def close(self) -> None:
        pass


DECODE_ATTENTION = "dspy_p2o_sdpa"  # transformers' SDPA attention with a grouped-query decode step (below)


def decode_sdpa(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                is_causal: bool | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention, except for a decode step on CPU: one query token per sequence,
    grouped-query attention (fewer key/value heads than query heads) and a padding mask.

    There transformers copies every key and value of the cache once per query head of its group
    (`repeat_kv`: SDPA's own grouped-query path is off with a mask, for CUDA's kernels' sake), at
    every layer of every decode step: at 32 sequences of ~450 tokens that was three times the KV
    cache written and read per step, more bytes than the weights. `enable_gqa=True` reads the
    cache as it is, with the same arithmetic (the same results to the bit). Anything else (prefill,
    training, GPU, dropout, a position bias) goes to transformers' own function unchanged."""
    groups = query.shape[1] // key.shape[1]
    if (query.shape[2] == 1 and groups > 1 and query.device.type == "cpu" and not dropout
            and kwargs.get("position_bias") is None and kwargs.get("cache") is None):
        out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                                               scale=scaling, enable_gqa=True)
        return out.transpose(1, 2).contiguous(), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **kwargs)


def use_decode_attention(model: torch.nn.Module) -> None:
    """Switch a model on transformers' SDPA attention to `decode_sdpa` (registered once, with SDPA's
    mask function). The switch lives in the model's config, not in saved checkpoints (transformers
    does not write the attention implementation); a shared trainer module computes exactly what it
    did, since everything but a decode step goes to transformers' SDPA."""
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa" or not hasattr(model, "set_attn_implementation"):
        return
    if DECODE_ATTENTION not in AttentionInterface._global_mapping:
        AttentionInterface.register(DECODE_ATTENTION, decode_sdpa)
        AttentionMaskInterface.register(DECODE_ATTENTION, sdpa_mask)
    model.set_attn_implementation(DECODE_ATTENTION)


MIN_SHARED_PREFIX = 16  # shorter common prefixes are prefilled with each prompt (a separate pass costs more)


def _shared_prefix(prompts: list[list[int]]) -> int:
    """How many leading tokens every prompt shares, leaving each prompt at least one of its own
    (its last position's logits start the decoding); 0 for one prompt or under MIN_SHARED_PREFIX."""
    if len(prompts) < 2:
        return 0
    shortest = min(len(p) for p in prompts) - 1
    first = prompts[0]
    shared = 0
    while shared < shortest and all(p[shared] == first[shared] for p in prompts):
        shared += 1
    return shared if shared >= MIN_SHARED_PREFIX else 0


def _kv_cache(config: Any) -> Cache:
    """The KV cache of one generate call: `GrowingLayer`s for full-attention models (the
    transformers default, `DynamicCache`, for models with sliding-window or other layer types)."""
    layer_types = set(getattr(config, "layer_types", None) or ["full_attention"])
    sliding = getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True)
    if layer_types != {"full_attention"} or sliding:
        return DynamicCache(config=config)
    return Cache(layer_class_to_replicate=GrowingLayer)


class GrowingLayer(DynamicLayer):
    """A KV-cache layer that writes each decode step into spare capacity, doubling it when full.

    transformers' `DynamicLayer` concatenates the whole cache with the new token at every step:
    at 32 sequences of ~400 tokens that copies as many bytes per step as the weights of
    SmolLM2-135M, and decoding on CPU is bound by memory traffic. Here a step writes one slot;
    `keys`/`values` are views of the filled part, so everything that reads them (attention,
    mask sizes, lengths) sees exactly what `DynamicLayer` would hold.
    """

    is_croppable = False  # the engine never crops; `crop` refuses instead of leaving views stale

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self._k = self._v = None
            self._length = 0
        end = self._length + key_states.shape[-2]
        if self._k is None or end > self._k.shape[-2]:
            self._grow(key_states, value_states, max(end + 64, 2 * end))
        self._k[:, :, self._length:end] = key_states
        self._v[:, :, self._length:end] = value_states
        self._length = end
        self._views()
        return self.keys, self.values

    def _grow(self, key_states: torch.Tensor, value_states: torch.Tensor, capacity: int) -> None:
        k = key_states.new_empty((*key_states.shape[:2], capacity, key_states.shape[-1]))
        v = value_states.new_empty((*value_states.shape[:2], capacity, value_states.shape[-1]))
        if self._length:
            k[:, :, :self._length], v[:, :, :self._length] = self.keys, self.values
        self._k, self._v = k, v

    def _views(self) -> None:
        self.keys, self.values = self._k[:, :, :self._length], self._v[:, :, :self._length]

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized and self._k is not None:
            self._k, self._v = self._k.repeat_interleave(repeats, 0), self._v.repeat_interleave(repeats, 0)
            self._views()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized and self._k is not None:
            self._k, self._v = self._k[indices], self._v[indices]
            self._views()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def crop(self, max_length: int) -> None:
        raise NotImplementedError("the engine's KV cache is never cropped")


def _cut_at_stop_string(text, toks, lps, stops, tokenizer):
    """Cut the completion at the first stop string: text without it, tokens up to the token completing it."""
    hits = [text.find(s) for s in stops if s in text]
    if not hits:
        return text, toks, lps, False
    cut = min(hits)
    stop_end = min(text.find(s) + len(s) for s in stops if s in text and text.find(s) == cut)
    # smallest token prefix whose decoding covers the stop string
    for k in range(1, len(toks) + 1):
        if len(tokenizer.decode(toks[:k], skip_special_tokens=False)) >= stop_end:
            return text[:cut], toks[:k], lps[:k], True
    return text[:cut], toks, lps, True
