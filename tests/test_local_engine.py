"""The embedded engine on a real tiny model: sampling, log-probs, padding, stops, weight sync."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dspy_p2o.engines import LocalEngine
from dspy_p2o.engines.base import SamplingParams
from dspy_p2o.engines.local import process_logits


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return LocalEngine(tiny_model_dir, device="cpu", dtype="float32")


def prompts_of(engine):
    msgs = [
        [{"role": "user", "content": "What is 3 + 4?"}],
        [{"role": "system", "content": "You add numbers."}, {"role": "user", "content": "What is 12 + 30? Answer now."}],
        [{"role": "user", "content": "7"}],
    ]
    return [engine.chat_prompt_ids(m) for m in msgs]


def recomputed_logprobs(model, prompt, completion, params):
    """Log-probs of `completion` after `prompt` from one unpadded forward pass."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1]
    return process_logits(logits, params).gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (20, 0.9)])
def test_batched_logprobs_match_forward_pass(engine, top_k, top_p):
    prompts = prompts_of(engine)
    assert len({len(p) for p in prompts}) == 3  # different lengths exercise left padding
    outs = engine.generate(prompts, n=3, temperature=0.7, top_k=top_k, top_p=top_p, max_tokens=12, seed=1)
    params = SamplingParams(temperature=0.7, top_k=top_k, top_p=top_p)
    assert [o.prompt_token_ids for o in outs] == prompts
    for out in outs:
        assert len(out.completions) == 3
        for c in out.completions:
            assert len(c.token_ids) == len(c.logprobs) > 0
            expected = recomputed_logprobs(engine.model, out.prompt_token_ids, c.token_ids, params)
            torch.testing.assert_close(torch.tensor(c.logprobs), expected, atol=1e-4, rtol=0)
    # n samples of a prompt are distinct draws, not copies
    assert len({tuple(c.token_ids) for c in outs[0].completions}) > 1


def test_greedy_matches_transformers_generate(engine):
    prompt = prompts_of(engine)[1]
    ours = engine.generate([prompt], n=1, temperature=0, max_tokens=10)[0].completions[0]
    with torch.no_grad():
        ref = engine.model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                    do_sample=False, max_new_tokens=10, eos_token_id=sorted(engine.eos_ids),
                                    pad_token_id=engine.pad_id)
    assert ours.token_ids == ref[0, len(prompt):].tolist()[: len(ours.token_ids)]


def test_seed_makes_sampling_reproducible(engine):
    prompts = prompts_of(engine)
    a = engine.generate(prompts, n=2, temperature=1.0, max_tokens=8, seed=123)
    b = engine.generate(prompts, n=2, temperature=1.0, max_tokens=8, seed=123)
    assert [[c.token_ids for c in o.completions] for o in a] == [[c.token_ids for c in o.completions] for o in b]


def test_eos_and_stop_strings_end_completions(format_model_dir):
    eng = LocalEngine(format_model_dir)
    import dspy

    from dspy_p2o.renderer import Renderer

    renderer = Renderer(dspy.ChainOfThought("question -> answer").predict, eng.tokenizer)
    prompt = renderer.render({"question": "What is 2 + 5?"}).token_ids
    full = eng.generate([prompt], temperature=0, max_tokens=40)[0].completions[0]
    assert full.finish_reason == "stop" and full.token_ids[-1] in eng.eos_ids
    assert "[[ ## answer ## ]]" in full.text and "<|im_end|>" not in full.text
    cut = eng.generate([prompt], temperature=0, max_tokens=40, stop=["[[ ## answer"])[0].completions[0]
    assert cut.finish_reason == "stop"
    assert "[[ ## answer" not in cut.text and full.text.startswith(cut.text)
    assert len(cut.token_ids) == len(cut.logprobs) < len(full.token_ids)
    short = eng.generate([prompt], temperature=0, max_tokens=3)[0].completions[0]
    assert short.finish_reason == "length" and len(short.token_ids) == 3


def test_sync_weights_from_module_and_dir(tiny_model_dir, format_model_dir):
    eng = LocalEngine(tiny_model_dir)
    prompt = prompts_of(eng)[0]
    before = eng.generate([prompt], temperature=0, max_tokens=6)[0].completions[0].logprobs
    trained = AutoModelForCausalLM.from_pretrained(format_model_dir)
    eng.sync_weights(trained)
    after = eng.generate([prompt], temperature=0, max_tokens=6)[0].completions[0].logprobs
    assert before != after
    eng2 = LocalEngine(tiny_model_dir)
    eng2.sync_weights(str(format_model_dir))
    assert eng2.generate([prompt], temperature=0, max_tokens=6)[0].completions[0].logprobs == pytest.approx(after, abs=1e-5)


def test_shared_module_keeps_training_mode(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model.train()
    eng = LocalEngine(model, tok)
    eng.generate([eng.chat_prompt_ids([{"role": "user", "content": "hi"}])], max_tokens=3)
    assert model.training
    eng.sync_weights(model)  # shared module: nothing to copy


def test_sync_weights_returns_the_engine_contracts_report(tiny_model_dir, format_model_dir):
    """Every engine's sync_weights returns a SyncReport (engines/base.py): nothing to do for a shared
    module, the copy's time otherwise; no served log-probs to compare in process."""
    from dspy_p2o.engines import SyncReport

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    shared = LocalEngine(model, AutoTokenizer.from_pretrained(tiny_model_dir))
    assert shared.sync_weights(model) == SyncReport(seconds=0.0, logprob_diff=None)
    copied = LocalEngine(tiny_model_dir).sync_weights(AutoModelForCausalLM.from_pretrained(format_model_dir))
    assert isinstance(copied, SyncReport) and copied.seconds > 0 and copied.logprob_diff is None


def test_bad_inputs_have_clear_errors(tmp_path, tiny_model_dir):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LocalEngine(tmp_path / "nope")
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        LocalEngine(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tok)
    eng = LocalEngine(tiny_model_dir)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        eng.generate([[1, 2], []])
    with pytest.raises(ValueError, match="top_p"):
        eng.generate([[1, 2]], top_p=0)


def test_finished_rows_leave_the_batch_without_changing_any_row(format_model_dir):
    """Rows that stop early are dropped from the decode batch (and its KV cache); every other row
    must continue exactly as if decoded alone: greedy batched == greedy one prompt at a time."""
    engine = LocalEngine(format_model_dir, device="cpu", dtype="float32")
    prompts = prompts_of(engine)
    batch_sizes = []
    hook = engine.model.register_forward_pre_hook(lambda m, a, kw: batch_sizes.append(kw["input_ids"].shape[0]),
                                                  with_kwargs=True)
    try:
        batched = engine.generate(prompts, n=1, temperature=0, max_tokens=24, stop=["7"])
    finally:
        hook.remove()
    alone = [engine.generate([p], n=1, temperature=0, max_tokens=24, stop=["7"])[0] for p in prompts]
    for b, a in zip(batched, alone):
        assert b.completions[0].token_ids == a.completions[0].token_ids
        torch.testing.assert_close(torch.tensor(b.completions[0].logprobs), torch.tensor(a.completions[0].logprobs),
                                   atol=1e-4, rtol=0)
    lengths = sorted(len(o.completions[0].token_ids) for o in batched)
    if lengths[0] < lengths[-1]:  # some row stopped first: later steps ran on fewer rows
        assert min(batch_sizes[1:]) < len(prompts)


def test_grouped_query_decode_step_samples_what_transformers_sdpa_does(tiny_model_dir, monkeypatch):
    """`decode_sdpa` reads the KV cache once per key/value head in a padded decode step (SDPA's own
    grouped-query path) where transformers' SDPA copies it per query head: the same tokens and the
    same log-probs, to the bit, for a seed."""
    import dspy_p2o.engines.local as local

    engine = LocalEngine(tiny_model_dir, device="cpu", dtype="float32")
    assert engine.model.config._attn_implementation == local.DECODE_ATTENTION
    assert engine.model.config.num_attention_heads > engine.model.config.num_key_value_heads
    prompts = prompts_of(engine)  # three lengths: every decode step has a padding mask
    grouped = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(query, key, value, *args, **kwargs):
        grouped.append(query.shape[2] == 1 and kwargs.get("attn_mask") is not None and kwargs.get("enable_gqa", False))
        return sdpa(query, key, value, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    ours = engine.generate(prompts, n=2, temperature=1.0, max_tokens=10, seed=5)
    assert any(grouped)  # the decode steps took the grouped-query path
    engine.model.set_attn_implementation("sdpa")
    grouped.clear()
    theirs = engine.generate(prompts, n=2, temperature=1.0, max_tokens=10, seed=5)
    assert not any(grouped)
    for a, b in zip(ours, theirs):
        assert [c.token_ids for c in a.completions] == [c.token_ids for c in b.completions]
        assert [c.logprobs for c in a.completions] == [c.logprobs for c in b.completions]


def test_shared_prompt_prefix_is_prefilled_once(engine):
    """Prompts that share a prefix (a program's instruction and demos) prefill it once, in a pass of
    its own; each prompt's own tokens follow it: the log-probs are still those of a forward pass
    over the whole prompt, with and without padding between the prefix and a prompt's own tokens."""
    system = {"role": "system", "content": "You add numbers. Think step by step, then answer with the sum only."}
    questions = ["What is 3 + 4?", "What is 12 + 30? Answer now.", "What is 5 + 6?"]
    prompts = [engine.chat_prompt_ids([system, {"role": "user", "content": q}]) for q in questions]
    assert len(prompts[0]) == len(prompts[2]) != len(prompts[1])  # padding for one prompt, none for another
    from dspy_p2o.engines.local import _shared_prefix

    shared = _shared_prefix(prompts)
    assert shared >= 16 and all(p[:shared] == prompts[0][:shared] for p in prompts)
    calls = []
    hook = engine.model.register_forward_pre_hook(lambda m, a, kw: calls.append(tuple(kw["input_ids"].shape)),
                                                  with_kwargs=True)
    try:
        outs = engine.generate(prompts, n=2, temperature=0.8, top_p=0.9, max_tokens=8, seed=3)
    finally:
        hook.remove()
    assert calls[0] == (1, shared)  # the prefix once
    assert calls[1] == (3, max(len(p) for p in prompts) - shared)  # then each prompt's own tokens
    params = SamplingParams(temperature=0.8, top_p=0.9)
    for out in outs:
        for c in out.completions:
            expected = recomputed_logprobs(engine.model, out.prompt_token_ids, c.token_ids, params)
            torch.testing.assert_close(torch.tensor(c.logprobs), expected, atol=1e-4, rtol=0)


def test_ended_rows_decoded_until_compacted_do_not_leak_tokens(format_model_dir):
    """A row that ends stays in the decode batch until ended rows are a quarter of it: what it samples
    after its end is never returned (its completion ends at its stop token or string)."""
    import dspy

    from dspy_p2o.renderer import Renderer

    engine = LocalEngine(format_model_dir, device="cpu", dtype="float32")
    renderer = Renderer(dspy.ChainOfThought("question -> answer").predict, engine.tokenizer)
    prompts = [renderer.render({"question": f"What is {a} + {b}?"}).token_ids for a, b in ((2, 5), (13, 4), (1, 1))]
    for stop in ((), ("[[ ## answer",)):
        outs = engine.generate(prompts, n=4, temperature=0.7, max_tokens=40, stop=stop, seed=11)
        lengths = [len(c.token_ids) for o in outs for c in o.completions]
        assert min(lengths) < max(lengths)  # some rows ended while others were decoded on
        for out in outs:
            for c in out.completions:
                assert len(c.token_ids) == len(c.logprobs)
                if c.finish_reason == "stop" and not stop:
                    assert c.token_ids[-1] in engine.eos_ids and not set(c.token_ids[:-1]) & engine.eos_ids
                if stop:
                    assert stop[0] not in c.text
                    assert stop[0] not in engine.tokenizer.decode(c.token_ids[:-1], skip_special_tokens=False)
