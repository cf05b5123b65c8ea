"""Self speculative decoding (arXiv 2510.04147): hand-worked chains, and the tokens of one-token-per-step
decoding on the trained model, greedy and sampled."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import dllm
from dllm.decoding import SpecialIds
from dllm.decoding.engine import pad_prompts
from dllm.tasks import suite_examples
from experiments.common import REPO_ROOT
from samplers import LowConfidence, SelfSpeculative

VOCAB, MASK, EOS = 8, 7, 6
SPECIAL = SpecialIds(mask=MASK, eos=EOS, eot=EOS, pad=0)


class Chain(nnx.Module):
    """A stand-in model, a function from tokens to logits: generation position j proposes one token
    with logit 30 - j (so the stepwise order is left to right). `agree`: always token 1, so every draft
    holds; else token 2 where position j - 1 is committed and token 1 where it is masked, so a draft
    made before its left neighbour was committed never holds."""

    def __init__(self, agree: bool):
        self.config = dllm.ModelConfig(vocab_size=VOCAB, d_model=8, n_layers=1, n_heads=1, mlp_hidden=8,
                                       max_seq_len=64)
        self.agree = agree

    def __call__(self, tokens, attention_mask=None, *, logits_start=0, logits_length=None, logits_offsets=None):
        gen = tokens[:, logits_start:]
        g = gen.shape[1]
        left_masked = jnp.concatenate([jnp.zeros_like(gen[:, :1], bool), gen[:, :-1] == MASK], axis=1)
        token = jnp.ones_like(gen) if self.agree else jnp.where(left_masked, 1, 2)
        return jax.nn.one_hot(token, VOCAB) * (30.0 - jnp.arange(g))[None, :, None]


def decode(model, sampler, gen_length=8, **kw):
    result = dllm.generate(model, [[3, 4]], sampler, gen_length=gen_length, block_length=8, special=SPECIAL, **kw)
    return np.asarray(result.tokens)[0].tolist(), int(result.nfe[0]), np.asarray(result.trace.committed_per_step)[0]


def test_drafts_that_hold_are_committed_together():
    """draft_length 3, blocks of 8: step 0 commits position 0 and drafts 1-3; step 1 verifies them and
    commits 1-4; step 2 commits 5-7 (its last canvas has no mask left in the block). Per block: 3 forwards."""
    tokens, nfe, per_step = decode(Chain(agree=True), SelfSpeculative(draft_length=3), gen_length=16)
    assert tokens == [1] * 16
    assert nfe == 6
    assert per_step[:6].tolist() == [1, 4, 3, 1, 4, 3]


def test_drafts_that_never_hold_cost_one_forward_per_token():
    stepwise = decode(Chain(agree=False), LowConfidence())
    tokens, nfe, per_step = decode(Chain(agree=False), SelfSpeculative(draft_length=3))
    assert tokens == stepwise[0] == [2] * 8
    assert nfe == 8 and per_step[:8].tolist() == [1] * 8


@pytest.fixture(scope="module")
def trained():
    model, tokenizer = dllm.from_pretrained(REPO_ROOT / "checkpoints" / "tiny-tasks")
    prompts = [tokenizer.encode(e.prompt) for e in suite_examples("test", 3)]  # 3 held-out prompts per task
    tokens, mask = pad_prompts(prompts, tokenizer.pad_id, 24)
    return model, tokenizer, tokens, mask


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_tokens_equal_one_token_per_step_decoding(trained, temperature):
    """Every held-out prompt of the ten tasks: the tokens of LowConfidence(steps=None), in fewer forwards.
    Sampled too: each verified canvas draws the noise of the stepwise step that reaches it."""
    model, tokenizer, tokens, mask = trained
    run = lambda sampler: dllm.generate(model, tokens, sampler, gen_length=24, block_length=8, tokenizer=tokenizer,
                                        attention_mask=mask, temperature=temperature, key=jax.random.key(5))
    stepwise, speculative = run(LowConfidence()), run(SelfSpeculative(draft_length=4))
    np.testing.assert_array_equal(np.asarray(speculative.tokens), np.asarray(stepwise.tokens))
    assert np.all(np.asarray(stepwise.nfe) == 24)
    assert np.asarray(speculative.nfe).mean() < 16, np.asarray(speculative.nfe)


def test_a_row_decodes_as_it_does_alone(trained):
    model, tokenizer, tokens, mask = trained
    keys = jax.random.split(jax.random.key(1), 4)
    run = lambda rows: dllm.generate(model, tokens[rows], SelfSpeculative(), gen_length=24, block_length=8,
                                     tokenizer=tokenizer, attention_mask=mask[rows], temperature=1.0, key=keys[rows])
    together = run(np.arange(4))
    for row in range(4):
        alone = run(np.array([row]))
        np.testing.assert_array_equal(np.asarray(alone.tokens)[0], np.asarray(together.tokens)[row])
        assert int(alone.nfe[0]) == int(together.nfe[row])


@pytest.mark.parametrize("settings, message", [
    (dict(cache="dual"), r"SelfSpeculative with cache='dual'.*allowed: cache='none'"),
    (dict(pipeline_blocks=2), r"SelfSpeculative with pipeline_blocks=2"),
])
def test_refused_settings(settings, message):
    with pytest.raises(ValueError, match=message):
        decode(Chain(agree=True), SelfSpeculative(), **settings)


def test_bad_draft_length():
    with pytest.raises(ValueError, match=r"SelfSpeculative.draft_length=0: allowed range \[1, inf\) \(an int\)"):
        SelfSpeculative(draft_length=0)


def test_block_causal_model_uncached():
    """A block-causal model decoded uncached (cache="auto" would pick the block cache, which it
    refuses): the stepwise tokens again, greedy."""
    model, tokenizer = dllm.from_pretrained(REPO_ROOT / "checkpoints" / "tiny-block")
    prompts = [tokenizer.encode(e.prompt) for e in suite_examples("test", 1)]
    tokens, mask = pad_prompts(prompts, tokenizer.pad_id, 24)
    run = lambda sampler: dllm.generate(model, tokens, sampler, gen_length=24, block_length=8, tokenizer=tokenizer,
                                        attention_mask=mask, cache="none")
    stepwise, speculative = run(LowConfidence()), run(SelfSpeculative(draft_length=4))
    np.testing.assert_array_equal(np.asarray(speculative.tokens), np.asarray(stepwise.tokens))
    assert np.asarray(speculative.nfe).mean() < 20, np.asarray(speculative.nfe)
