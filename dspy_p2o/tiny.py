"""Tiny offline models: a BPE tokenizer trained on the text it will see, a small
Qwen3- (or Llama-) shaped transformer, saved with `save_pretrained`.

They take the same code path as a hub model (AutoTokenizer / AutoModelForCausalLM
from a directory), so tests, the toy world and benchmarks exercise the real stack
with no hub access. `supervised_finetune` teaches such a model an output format
(e.g. DSPy's ChatAdapter fields) in seconds on CPU.
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1024, *, merge_across_spaces: bool = True):
    """A byte-level BPE tokenizer with a ChatML chat template, trained on `texts`.

    With `merge_across_spaces` merges may span words, so DSPy's repeated adapter
    boilerplate ("[[ ## answer ## ]]") becomes a few tokens; digits always stay
    single tokens so a tiny model can do arithmetic on them.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=not merge_across_spaces),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
        max_token_length=24,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|pad|>", bos_token=None,
        unk_token=None, additional_special_tokens=["<|endoftext|>", "<|im_start|>"],
    )
    fast.chat_template = CHATML_TEMPLATE
    fast.padding_side = "left"
    return fast


def tiny_config(tokenizer: Any, *, arch: str = "qwen3", hidden_size: int = 64, num_layers: int = 2,
                num_heads: int = 4, num_kv_heads: int = 2, intermediate_size: int | None = None,
                max_positions: int = 2048, head_dim: int | None = None, tie_word_embeddings: bool = True):
    """A small transformers config of the given family sized for `tokenizer`.

    `head_dim` (Qwen3 only) decouples the attention head size from hidden_size / num_heads:
    vLLM's CPU attention serves head sizes 32, 64, 80, 96, 112, 128, 160, 192, 224, 256 and 512
    only, so a model meant for a real vLLM server needs one of those (see `VLLM_CPU_HEAD_DIMS`).
    """
    from transformers import LlamaConfig, Qwen3Config

    common = dict(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_positions, tie_word_embeddings=tie_word_embeddings,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
    )
    if arch == "qwen3":
        return Qwen3Config(head_dim=head_dim or hidden_size // num_heads, **common)
    if head_dim is not None:
        raise ValueError("head_dim is a Qwen3 option; a Llama config's head size is hidden_size / num_heads")
    if arch == "llama":
        return LlamaConfig(**common)
    raise ValueError(f"unknown tiny-model architecture {arch!r}; use 'qwen3' or 'llama'")


def build_tiny_model(out_dir: str | Path, texts: Iterable[str] | None = None, *, vocab_size: int = 1024,
                     seed: int = 0, **config_kwargs: Any) -> Path:
    """Train a tokenizer on `texts` (default: rendered DSPy maths prompts), build a random-init
    model around it and `save_pretrained` both into `out_dir`."""
    from transformers import AutoModelForCausalLM

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(texts if texts is not None else default_corpus(), vocab_size)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(tokenizer, **config_kwargs))
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def default_corpus(n: int = 400, seed: int = 0) -> list[str]:
    """Rendered DSPy chat prompts and completions for small arithmetic questions."""
    import dspy

    rng = random.Random(seed)
    adapter = dspy.ChatAdapter(use_json_adapter_fallback=False)
    signatures = [dspy.ChainOfThought("question -> answer").predict.signature,
                  dspy.Predict("question -> answer").signature]
    texts = []
    for i in range(n):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        sig = signatures[i % len(signatures)]
        messages = adapter.format(sig, [], {"question": f"What is {a} + {b}?"})
        fields = {"reasoning": f"{a} + {b} = {a + b}", "answer": str(a + b)}
        completion = adapter.format_assistant_message_content(
            sig, {k: v for k, v in fields.items() if k in sig.output_fields})
        texts.append("".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
                     + f"<|im_start|>assistant\n{completion}<|im_end|>")
    return texts


def supervised_finetune(model: torch.nn.Module, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], *,
                        steps: int = 200, lr: float = 3e-3, batch_size: int = 16, seed: int = 0,
                        pad_id: int = 0, warmup: int = 10, progress: bool = False) -> list[float]:
    """Next-token training on completions only (prompt tokens masked), AdamW with cosine decay.

    `pairs` are (prompt_ids, completion_ids); include the EOS id in the completion so
    the model learns to stop. Returns the loss per step. `progress` shows a tqdm bar.
    """
    rng = random.Random(seed)
    torch.manual_seed(seed)
    device = next(model.parameters()).device
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    model.train()
    losses = []
    from tqdm.auto import tqdm

    bar = tqdm(total=steps, desc="pretrain", unit="step", disable=not progress, leave=False)
    for _ in range(steps):
        batch = [pairs[rng.randrange(len(pairs))] for _ in range(batch_size)]
        width = max(len(p) + len(c) for p, c in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, (p, c) in enumerate(batch):  # right padding is fine for training
            seq = list(p) + list(c)
            ids[row, :len(seq)] = torch.tensor(seq)
            labels[row, len(p):len(seq)] = torch.tensor(list(c))
            mask[row, :len(seq)] = 1
        out = model(input_ids=ids.to(device), attention_mask=mask.to(device), labels=labels.to(device))
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        schedule.step()
        opt.zero_grad(set_to_none=True)
        losses.append(out.loss.item())
        bar.update(1)
        if len(losses) % 25 == 0:
            bar.set_postfix(loss=f"{sum(losses[-25:]) / 25:.3f}")
    bar.close()
    model.eval()
    return losses


def teach_sum_format(model_dir: str | Path, out_dir: str | Path, *, steps: int = 150, seed: int = 0) -> Path:
    """Fine-tune a tiny model on DSPy's ChatAdapter output format for `question -> answer` CoT
    (single-digit sums) and `save_pretrained` it into `out_dir`, so real DSPy calls parse.
    Accuracy is not the point; format is. Used by the tests and the benchmarks."""
    import dspy

    from dspy_p2o.engines.local import LocalEngine
    from dspy_p2o.renderer import Renderer

    engine = LocalEngine(model_dir)
    renderer = Renderer(dspy.ChainOfThought("question -> answer").predict, engine.tokenizer)
    rng = random.Random(seed)
    pairs = []
    for _ in range(200):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        prompt = renderer.render({"question": f"What is {a} + {b}?"}).token_ids
        text = renderer.adapter.format_assistant_message_content(
            renderer.signature, {"reasoning": f"{a} + {b} = {a + b}", "answer": str(a + b)})
        completion = engine.tokenizer(text, add_special_tokens=False)["input_ids"] + [engine.tokenizer.eos_token_id]
        pairs.append((prompt, completion))
    supervised_finetune(engine.model, pairs, steps=steps, lr=8e-3, batch_size=16, pad_id=engine.pad_id)
    engine.model.save_pretrained(out_dir)
    engine.tokenizer.save_pretrained(out_dir)
    return Path(out_dir)
