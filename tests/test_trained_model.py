"""Every sampler decodes the bundled, trained `tiny-tasks` model on held-out prompts.

The figures in the README come from `experiments/compare_samplers.py` on 200
prompts per task; this test is a small, fast slice of the same run.
"""

import jax
import pytest
from hydra.utils import instantiate

import dllm
import samplers
from dllm import evaluation
from dllm.decoding import DecodeConfig, pad_prompts
from dllm.decoding.sampler import sampler_names, sampler_spec
from dllm.tasks import suite_examples
from experiments.common import REPO_ROOT

SAMPLER_YAMLS = sampler_names()  # the registry
COMPOSITIONS = {
    "early_commit(threshold)": {"_target_": "samplers.early_commit.EarlyCommit",
                                "inner": {"_target_": "samplers.threshold.Threshold", "tau": 0.9}},
    "adaptive_block(credit)": {"_target_": "samplers.adaptive_block.AdaptiveBlock", "delimiters": ["/"],
                               "inner": {"_target_": "samplers.credit.Credit"}},
}
DECODE = DecodeConfig(gen_length=24, block_length=8)


@pytest.fixture(scope="module")
def trained():
    model, tokenizer = dllm.from_pretrained(REPO_ROOT / "checkpoints" / "tiny-tasks")
    examples = suite_examples("test", 3)  # 3 held-out prompts of each of the 10 tasks
    return model, tokenizer, examples


def run(trained, spec, decode=DECODE):
    model, tokenizer, examples = trained
    sampler = instantiate(spec, _convert_="all")
    return evaluation.evaluate_examples(model, tokenizer, sampler, examples, decode, batch_size=30,
                                        key=jax.random.key(0), prompt_width=24)["summary"]


def test_checkpoint_metadata(trained):
    model, tokenizer, _ = trained
    assert model.config.vocab_size == tokenizer.vocab_size == 57
    assert tokenizer.special_ids["mask"] == 2 and tokenizer.special_ids["eos"] == 1


@pytest.mark.parametrize("name", SAMPLER_YAMLS + list(COMPOSITIONS))
def test_sampler_on_trained_model(trained, name):
    spec = COMPOSITIONS.get(name) or sampler_spec(name)
    summary = run(trained, spec)
    assert summary["accuracy"] >= 0.9, summary
    if name in ("low_confidence", "dingo"):  # one token per step (dingo's YAML: a pattern over LowConfidence)
        assert summary["mean_nfe"] == 24
    elif name == "end_of_text":  # one token per step until the predicted end: the EOS tail costs no steps
        assert 8 <= summary["mean_nfe"] < 22, summary
    elif name == "self_speculative":  # one-token-per-step tokens; each block's first forward commits one
        assert summary["mean_nfe"] < 16, summary
    else:  # a parallel rule must actually decode in parallel on a trained model
        assert summary["mean_nfe"] < 12, summary


def test_cached_threshold_on_trained_model(trained):
    """The caches really run through the evaluation path (decode_texts once dropped the cache
    settings, so "cached" results were uncached) and keep accuracy on every task but
    `shuffle`, which both caches break on this model (experiments/results/cache/README.md)."""
    import numpy as np

    from samplers import Threshold

    model, tokenizer, examples = trained
    prompts = [tokenizer.encode(e.prompt) for e in examples]
    tokens, mask = pad_prompts(prompts, tokenizer.pad_id, 24)
    key = jax.random.fold_in(jax.random.key(0), 0)  # decode_texts' key of its first batch
    uncached = dllm.generate(model, tokens, Threshold(tau=0.9), gen_length=24, block_length=8, key=key,
                             tokenizer=tokenizer, attention_mask=mask).tokens
    for mode in ("prefix", "dual", "dkv"):
        decode = DecodeConfig(gen_length=24, block_length=8, cache=mode)
        result = evaluation.evaluate_examples(model, tokenizer, Threshold(tau=0.9), examples, decode, batch_size=30,
                                              key=jax.random.key(0), prompt_width=24)
        direct = dllm.generate(model, tokens, Threshold(tau=0.9), gen_length=24, block_length=8, key=key,
                               tokenizer=tokenizer, attention_mask=mask, cache=mode).tokens
        np.testing.assert_array_equal([row["tokens"] for row in result["rows"]], direct, err_msg=mode)
        assert np.any(np.asarray(direct) != np.asarray(uncached)), mode  # the cache changed something
        per_task = result["summary"]["per_task"]
        assert all(t["accuracy"] >= 0.9 for name, t in per_task.items() if name != "shuffle"), (mode, per_task)
        assert result["summary"]["mean_nfe"] < 12, (mode, result["summary"])


@pytest.mark.parametrize("cache", ["none", "dual", "dkv"])
def test_window_only_logits_decode_the_same_tokens(trained, cache):
    """Samplers that read only the active block get the output head for the blocks alone
    (`Sampler.reads_only_window`); recording every position's confidence turns that off,
    and the tokens must not change."""
    import numpy as np

    import samplers

    model, tokenizer, examples = trained
    tokens, mask = pad_prompts([tokenizer.encode(e.prompt) for e in examples], tokenizer.pad_id, 24)
    for sampler in (samplers.LowConfidence(), samplers.Threshold(tau=0.7), samplers.Factor()):
        assert sampler.reads_only_window
        runs = [dllm.generate(model, tokens, sampler, gen_length=24, block_length=8, key=jax.random.key(1),
                              tokenizer=tokenizer, attention_mask=mask, cache=cache, temperature=0.5,
                              record_confidence=full) for full in (False, True)]
        np.testing.assert_array_equal(runs[0].tokens, runs[1].tokens, err_msg=type(sampler).__name__)
        np.testing.assert_array_equal(runs[0].nfe, runs[1].nfe, err_msg=type(sampler).__name__)


@pytest.mark.parametrize("name, attention, block_size, block_length",
                         [("tiny-ar", "block_causal", 1, 1), ("tiny-block", "block_causal", 8, 8),
                          ("tiny-full", "bidirectional", None, 8)])
def test_attention_variants_decode(name, attention, block_size, block_length):
    """The three bundled attention variants load with their pattern and decode held-out prompts."""
    model, tokenizer = dllm.from_pretrained(REPO_ROOT / "checkpoints" / name)
    assert (model.config.attention, model.config.block_size) == (attention, block_size)
    summary = evaluation.evaluate_examples(model, tokenizer, samplers.LowConfidence(), suite_examples("test", 2),
                                           DecodeConfig(gen_length=24, block_length=block_length), batch_size=20,
                                           prompt_width=24)["summary"]
    assert summary["accuracy"] >= 0.9 and summary["mean_nfe"] == 24, summary


def test_elastic_cache_on_trained_model(trained):
    """Elastic-Cache over its sliding window (the authors' settings: threshold 0.9, window 16 here 8,
    gamma 0.9, one tracked token per layer, the whole generation as one block) decodes held-out
    prompts: the evaluation path carries its settings (the same tokens as `generate`), it decodes in
    parallel and keeps accuracy; gamma 0.9 decodes other tokens than a bar that never refreshes and one
    that refreshes from layer 1 at every step; a row decodes alone as in the batch."""
    import numpy as np

    from samplers import Threshold

    model, tokenizer, examples = trained
    decode = DecodeConfig(gen_length=24, block_length=24, cache="elastic", sliding_window=8)
    result = evaluation.evaluate_examples(model, tokenizer, Threshold(tau=0.9), examples, decode, batch_size=30,
                                          key=jax.random.key(0), prompt_width=24)
    tokens, mask = pad_prompts([tokenizer.encode(e.prompt) for e in examples], tokenizer.pad_id, 24)
    key = jax.random.fold_in(jax.random.key(0), 0)  # decode_texts' key of its first batch
    direct = dllm.generate(model, tokens, Threshold(tau=0.9), gen_length=24, block_length=24, key=key,
                           tokenizer=tokenizer, attention_mask=mask, cache="elastic", sliding_window=8)
    np.testing.assert_array_equal([row["tokens"] for row in result["rows"]], direct.tokens)
    summary = result["summary"]
    assert summary["accuracy"] >= 0.8 and summary["mean_nfe"] < 12, summary
    runs = {gamma: dllm.generate(model, tokens, Threshold(tau=0.9), gen_length=24, block_length=24, key=key,
                                 tokenizer=tokenizer, attention_mask=mask, cache="elastic", sliding_window=8,
                                 elastic_gamma=gamma).tokens for gamma in (-1.0, 2.0)}
    for gamma, other in runs.items():  # the bar decides what the steps recompute: never, sometimes, always
        assert np.any(np.asarray(other) != np.asarray(direct.tokens)), gamma
    keys = jax.random.split(key, len(tokens))  # batch invariance with the drift test deciding per row
    batch = dllm.generate(model, tokens, Threshold(tau=0.9), gen_length=24, block_length=24, key=keys,
                          tokenizer=tokenizer, attention_mask=mask, cache="elastic", sliding_window=8)
    for row in (0, 7, 18):  # three tasks, three prompt lengths
        alone = dllm.generate(model, [tokenizer.encode(examples[row].prompt)], Threshold(tau=0.9), gen_length=24,
                              block_length=24, key=keys[row:row + 1], tokenizer=tokenizer, cache="elastic",
                              sliding_window=8)
        np.testing.assert_array_equal(alone.tokens[0], batch.tokens[row])
