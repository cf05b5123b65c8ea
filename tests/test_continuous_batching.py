"""Continuous batching (`dllm.generate(slots=...)`, issue: speed round 2): prompts decode through a few
batch slots, a finished row's slot taking the next prompt inside the compiled loop. Every row must equal
the same prompt decoded in one static batch (which equals its decode alone: tests/test_batch_invariance.py):
tokens, NFE and trace. The reference is the static engine, an independent route through the loop.

The prompts of the trained tiny-tasks model finish at different steps under threshold-like rules (NFE 3 to
10 here), so slots are refilled at different steps and some rows wait in the queue for several refills.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from hydra.utils import instantiate

import dllm
from dllm import evaluation
from dllm.decoding import DecodeConfig, engine
from experiments.common import REPO_ROOT
from tests.helpers import GRID_PROMPTS, grid_sampler_specs

pytestmark = pytest.mark.usefixtures("release_after_each_test")  # see tests/conftest.py
FAST_COMPILE = {"xla_backend_optimization_level": 0}  # as tests/test_batch_invariance.py
PROMPTS = GRID_PROMPTS * 2 + GRID_PROMPTS[:1]  # 11 prompts through 3 slots
SPECS = grid_sampler_specs()


@pytest.fixture(scope="module")
def tiny():
    return dllm.from_pretrained(REPO_ROOT / "checkpoints/tiny-tasks")


def encoded(tokenizer, prompts=PROMPTS):
    return engine.pad_prompts([tokenizer.encode(p) for p in prompts], tokenizer.pad_id, 15)


def both(model, tokenizer, sampler, slots=3, template=None, **fields):
    """(static, continuous) results of the same prompts, keys and settings. The static decode runs static
    batches of `slots` rows (the last one filled up with copies), the shape of the continuous loop's batch:
    XLA may reassociate float sums differently at another batch size, and LowConfidence's top-k among the
    tiny model's near-equal confidences (0.999999) then resolves a tie in another order (the same tokens)."""
    tokens, mask = encoded(tokenizer)
    n = len(tokens)
    kw = dict(gen_length=24, block_length=8, tokenizer=tokenizer, compiler_options=FAST_COMPILE, **fields)
    keys = engine.prompt_keys(jax.random.key(7), np.arange(n))
    parts = []
    for start in range(0, n, slots):
        rows = np.minimum(np.arange(start, start + slots), n - 1)
        out = dllm.generate(model, tokens[rows], sampler, key=keys[rows], attention_mask=mask[rows],
                            template=None if template is None else template[rows], **kw)
        keep = n - start
        parts.append(jax.tree.map(lambda a: np.asarray(a)[:, :keep] if a.ndim == 3 else np.asarray(a)[:keep], out))
    cat = lambda *leaves: np.concatenate(leaves, axis=1 if leaves[0].ndim == 3 else 0)  # confidence: [steps, B, G]
    static = jax.tree.map(cat, *parts)
    return static, dllm.generate(model, tokens, sampler, key=jax.random.key(7), attention_mask=mask, slots=slots,
                                 template=template, **kw)


def assert_same(static, continuous):
    np.testing.assert_array_equal(continuous.tokens, static.tokens)
    np.testing.assert_array_equal(continuous.nfe, static.nfe)
    np.testing.assert_array_equal(continuous.trace.commit_step, static.trace.commit_step)
    np.testing.assert_array_equal(continuous.trace.committed_per_step, static.trace.committed_per_step)


# Samplers whose carry or rule reads the row's step (credit's history slots, early commit's phase, the learned
# filter's step fraction), keeps per-block state (low confidence's schedule, adaptive block's window), or
# drafts canvases (self-speculative), each under a cache it accepts; threshold under every other cache.
CASES = [("threshold", "none"), ("threshold", "prefix"), ("threshold", "dkv"), ("threshold", "elastic"),
         ("credit", "dual"), ("early_commit", "none"), ("learned_filter", "dual"), ("low_confidence", "prefix"),
         ("adaptive_block", "none"), ("self_speculative", "none")]


@pytest.mark.parametrize("name,cache", CASES)
def test_every_row_equals_its_static_decode(tiny, name, cache):
    model, tokenizer = tiny
    sampler = instantiate(SPECS[name], _convert_="all")
    extra = {"sliding_window": 4} if cache == "elastic" else {}
    static, continuous = both(model, tokenizer, sampler, cache=cache, temperature=1.0, **extra)
    assert_same(static, continuous)
    assert not np.any(np.asarray(static.tokens) == tokenizer.mask_id)
    if name == "threshold" and cache == "none":  # the rows really finish at different steps
        assert len(set(np.asarray(static.nfe).tolist())) > 1


def test_recorded_confidence_is_indexed_by_the_rows_own_step(tiny):
    model, tokenizer = tiny
    sampler = instantiate(SPECS["threshold"], _convert_="all")
    static, continuous = both(model, tokenizer, sampler, record_confidence=True)
    assert_same(static, continuous)
    np.testing.assert_array_equal(continuous.trace.confidence, static.trace.confidence)


def test_a_row_stopped_by_max_steps_frees_its_slot_as_it_stops_alone(tiny):
    """One token per step for 24 positions under max_steps=10: every row stops with masks left after 10
    of its own steps, and the queue goes on."""
    model, tokenizer = tiny
    static, continuous = both(model, tokenizer, instantiate(SPECS["low_confidence"], _convert_="all"), max_steps=10)
    assert_same(static, continuous)
    assert np.all(np.asarray(continuous.nfe) == 10)
    assert np.all((np.asarray(continuous.tokens) == tokenizer.mask_id).sum(-1) == 14)


def test_infilling_templates_follow_their_prompts_into_the_slots(tiny):
    model, tokenizer = tiny
    template = np.full((len(PROMPTS), 24), tokenizer.mask_id, np.int32)
    template[:, 8:12] = np.array(tokenizer.encode("Ann Bob Cid Dan"))[:4]
    template[3, :] = np.arange(24) % 5 + 4  # a row with nothing to fill: done before its first step
    template[3, 0] = tokenizer.mask_id
    static, continuous = both(model, tokenizer, instantiate(SPECS["threshold"], _convert_="all"), template=template)
    assert_same(static, continuous)
    np.testing.assert_array_equal(np.asarray(continuous.tokens)[:, 8:12], template[:, 8:12])


def test_count_decodes_only_the_head_of_the_queue(tiny):
    model, tokenizer = tiny
    tokens, mask = encoded(tokenizer)
    kw = dict(gen_length=24, block_length=8, key=jax.random.key(7), tokenizer=tokenizer, attention_mask=mask,
              compiler_options=FAST_COMPILE)
    sampler = instantiate(SPECS["threshold"], _convert_="all")
    full = dllm.generate(model, tokens, sampler, slots=4, **kw)
    head = dllm.generate(model, tokens, sampler, slots=4, count=6, **kw)
    np.testing.assert_array_equal(np.asarray(head.tokens)[:6], np.asarray(full.tokens)[:6])
    assert np.all(np.asarray(head.tokens)[6:] == tokenizer.mask_id) and np.all(np.asarray(head.nfe)[6:] == 0)


def test_evaluation_with_continuous_batching_gives_the_static_rows(tiny):
    """`decode_texts(continuous=True)` in queues of 4 (the last one padded, its padding never decoded)."""
    model, tokenizer = tiny
    sampler = instantiate(SPECS["threshold"], _convert_="all")
    decode = DecodeConfig(gen_length=24, block_length=8, cache="dual", temperature=1.0)
    kw = dict(key=jax.random.key(3), prompt_width=15, progress=False, compiler_options=FAST_COMPILE)
    static, _ = evaluation.decode_texts(model, tokenizer, sampler, PROMPTS, decode, batch_size=11, **kw)
    rows, timing = evaluation.decode_texts(model, tokenizer, sampler, PROMPTS, decode, batch_size=2, continuous=True,
                                           queue_length=4, **kw)
    assert [(r["tokens"], r["nfe"]) for r in rows] == [(r["tokens"], r["nfe"]) for r in static]
    assert timing["continuous"] and timing["batches"] == 3 and timing["prompts_per_s"] > 0


def test_bad_continuous_batching_settings_are_refused(tiny):
    model, tokenizer = tiny
    sampler = instantiate(SPECS["threshold"], _convert_="all")
    kw = dict(gen_length=24, block_length=8, tokenizer=tokenizer)
    prompts = [tokenizer.encode(p) for p in PROMPTS[:3]]
    for slots in (0, -2, True, 1.5):
        with pytest.raises(ValueError, match=rf"slots={slots!r}: must be an int >= 1"):
            dllm.generate(model, prompts, sampler, slots=slots, **kw)
    for count in (0, 4, 2.0):
        with pytest.raises(ValueError, match=rf"count={count!r}: allowed an int in 1..3"):
            dllm.generate(model, prompts, sampler, slots=2, count=count, **kw)
    with pytest.raises(ValueError, match="count=2 without slots"):
        dllm.generate(model, prompts, sampler, count=2, **kw)
    with pytest.raises(ValueError, match="slots= with cache='block': the exact block cache prefills"):
        engine.check_slots(4, DecodeConfig(gen_length=24, block_length=8, cache="block"))
    with pytest.raises(ValueError, match="queue_length=4 without continuous=True"):
        evaluation.decode_texts(model, tokenizer, sampler, PROMPTS[:3], DecodeConfig(gen_length=24, block_length=8),
                                batch_size=2, queue_length=4, progress=False)
    with pytest.raises(ValueError, match="queue_length=0: must be an int >= 1"):
        evaluation.decode_texts(model, tokenizer, sampler, PROMPTS[:3], DecodeConfig(gen_length=24, block_length=8),
                                batch_size=2, continuous=True, queue_length=0, progress=False)
