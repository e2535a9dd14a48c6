"""The embedded engine: a transformers causal LM sampled in process (CPU or one GPU).

A hand-written sampling loop (rather than `model.generate`) so that the log-prob of
every sampled token under the *processed* distribution (temperature, top-k, top-p) is
exact -- these are the behaviour log-probs the trainer compares against -- and so that
n samples of a prompt share one prefill, and a decode step reads the KV cache once per
key/value head (`decode_sdpa`). The engine may share the trainer's module: then syncing
weights costs nothing.
"""

from __future__ import annotations

import contextlib
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
        with self._lock, self._inference_mode():
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

    def _sample_chunk(self, prompts: list[list[int]], n: int, params: SamplingParams, generator) -> list[list[Completion]]:
        device = self.device
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, p in enumerate(prompts):  # left padding: every prompt ends at the last column
            ids[row, width - len(p):] = torch.tensor(p)
            mask[row, width - len(p):] = 1
        ids, mask = ids.to(device), mask.to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = _kv_cache(self.model.config)
        # Prefill each prompt once, then fan the cache out to its n samples. Only the last position's
        # logits are needed: the LM head over every prompt position (49k vocabulary) cost more than decoding.
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True,
                         logits_to_keep=1)
        last_logits = out.logits[:, -1, :]
        if n > 1:
            cache.batch_repeat_interleave(n)
            last_logits = last_logits.repeat_interleave(n, dim=0)
            mask = mask.repeat_interleave(n, dim=0)
            positions = positions.repeat_interleave(n, dim=0)
        rows = last_logits.shape[0]
        next_pos = positions[:, -1:] + 1
        stop_ids = torch.tensor(sorted(self.eos_ids | set(params.stop_token_ids)), device=device)
        tokens = torch.full((rows, params.max_tokens), self.pad_id, dtype=torch.long, device=device)
        logps = torch.zeros((rows, params.max_tokens), dtype=torch.float32, device=device)
        finished = torch.zeros(rows, dtype=torch.bool, device=device)
        # `live[i]` is the output row of batch row i. A row that finishes leaves the batch (and its
        # KV cache): later decode steps run only on the rows still sampling.
        live = torch.arange(rows, device=device)
        length = 0
        for step in range(params.max_tokens):
            logprobs = process_logits(last_logits, params)
            if params.temperature == 0:
                token = logprobs.argmax(dim=-1)
            else:
                token = torch.multinomial(logprobs.exp(), 1, generator=generator).squeeze(-1)
            tokens[live, step] = token
            logps[live, step] = logprobs.gather(-1, token[:, None]).squeeze(-1)
            length = step + 1
            done = torch.isin(token, stop_ids)
            if params.stop:
                done |= self._hits_stop_string(tokens[live, :length], done, params.stop)
            finished[live[done]] = True
            if display.decoding():  # an evaluation's live line (samples done, tokens/s); all rows end at the limit
                rows = int(token.numel())
                display.decoded(rows, rows if length == params.max_tokens else int(done.sum()))
            if bool(done.all()) or length == params.max_tokens:
                break
            if bool(done.any()):
                keep = (~done).nonzero().squeeze(-1)
                cache.batch_select_indices(keep)
                live, token, mask, next_pos = live[keep], token[keep], mask[keep], next_pos[keep]
            mask = torch.cat([mask, torch.ones((mask.shape[0], 1), dtype=mask.dtype, device=device)], dim=1)
            out = self.model(input_ids=token[:, None], attention_mask=mask, position_ids=next_pos,
                             past_key_values=cache, use_cache=True)
            last_logits = out.logits[:, -1, :]
            next_pos = next_pos + 1
        tokens, logps = tokens[:, :length], logps[:, :length]
        return self._collect(tokens.tolist(), logps.tolist(), finished.tolist(), n, params, stop_ids.tolist())

    def _hits_stop_string(self, tokens: torch.Tensor, done: torch.Tensor, stops: tuple[str, ...]) -> torch.Tensor:
        """Which running rows have just produced a stop string (checked on a short decoded tail)."""
        longest = max(len(s) for s in stops)
        tail_tokens = max(4, longest)  # a token decodes to >= 1 character for these tokenizers
        hits = torch.zeros_like(done)
        for row in (~done).nonzero().flatten().tolist():
            tail = self.tokenizer.decode(tokens[row, -tail_tokens:].tolist(), skip_special_tokens=False)
            if any(s in tail for s in stops):
                hits[row] = True
        return hits

    def _collect(self, tokens, logps, finished, n, params, stop_ids) -> list[list[Completion]]:
        stop_set = set(stop_ids)
        results: list[list[Completion]] = []
        for row, (toks, lps, done) in enumerate(zip(tokens, logps, finished)):
            if row % n == 0:
                results.append([])
            length = len(toks)
            for j, t in enumerate(toks):
                if t in stop_set:
                    length = j + 1  # keep the EOS token: the trainer must learn to emit it
                    break
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
