"""Infilling (`generate(..., template=)`): fixed tokens after and between masked spans, decoded by every
sampler, cached or not, on the trained tiny-tasks model; a model given only as a function; bad templates."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hydra.utils import instantiate

import dllm
import samplers
from dllm.decoding import SpecialIds, steps
from dllm.decoding.engine import pad_prompts, sampler_chain
from dllm.tasks import get_task, suite_examples
from experiments.common import REPO_ROOT
from tests.helpers import grid_sampler_specs, refusal

pytestmark = pytest.mark.usefixtures("release_after_each_test")  # see tests/conftest.py
FAST_COMPILE = {"xla_backend_optimization_level": 0}
GEN, BLOCK = 24, 8
TASKS = ("reverse", "sort", "latin_square", "sudoku", "insert_index")  # deterministic or validity-scored


@pytest.fixture(scope="module")
def filled():
    """Two held-out prompts of five tasks, each answer with two spans masked (positions 2-6 and 11-14:
    the second block has fixed tokens on both sides, the third only a fixed tail) and EOS padding."""
    model, tokenizer = dllm.from_pretrained(REPO_ROOT / "checkpoints" / "tiny-tasks")
    examples = [e for e in suite_examples("test", 2) if e.task in TASKS]
    prompts, mask = pad_prompts([tokenizer.encode(e.prompt) for e in examples], tokenizer.pad_id, 24)
    answers = np.array([(tokenizer.encode(e.answer) + [tokenizer.eos_id] * GEN)[:GEN] for e in examples])
    template = answers.copy()
    template[:, 2:7] = tokenizer.mask_id
    template[:, 11:15] = tokenizer.mask_id
    return model, tokenizer, examples, prompts, mask, answers, template


def infill(filled, sampler, **kw):
    model, tokenizer, _, prompts, mask, _, template = filled
    result = dllm.generate(model, prompts, sampler, gen_length=GEN, block_length=BLOCK, tokenizer=tokenizer,
                           attention_mask=mask, template=template, compiler_options=FAST_COMPILE, **kw)
    return np.asarray(result.tokens), np.asarray(result.nfe)


def check_filled(filled, tokens, nfe, label):
    _, tokenizer, examples, _, _, answers, template = filled
    fixed = template != tokenizer.mask_id
    np.testing.assert_array_equal(tokens[fixed], template[fixed], err_msg=f"{label}: a fixed token moved")
    assert not np.any(tokens == tokenizer.mask_id), f"{label}: masks left"
    assert np.all(nfe <= (~fixed).sum(-1)), f"{label}: more forwards than masked positions"
    scores = [get_task(e.task).score(e, tokenizer.decode(list(row[:list(row).index(tokenizer.eos_id)])))
              for e, row in zip(examples, tokens)]
    assert np.mean(scores) >= 0.8, (label, scores)


@pytest.mark.parametrize("name", sorted(grid_sampler_specs()))
def test_every_sampler_fills_the_spans(filled, name):
    """Uncached and over the dual cache (the prefix cache for two rules below); a refused cache is
    asserted refused."""
    sampler = instantiate(grid_sampler_specs()[name], _convert_="all")
    _, tokenizer, *_ = filled
    if any(rule.writes_end_of_text for rule in sampler_chain(sampler)):
        with pytest.raises(ValueError, match=f"template= with {type(sampler).__name__}"):
            infill(filled, sampler)
        return
    for cache in ("none", "dual"):
        if refusal(sampler.bind(tokenizer), cache=cache, gen_length=GEN, block_length=BLOCK):
            with pytest.raises(ValueError, match=f"cache='{cache}'"):
                infill(filled, sampler, cache=cache)
            continue
        tokens, nfe = infill(filled, sampler, cache=cache)
        check_filled(filled, tokens, nfe, f"{name}/{cache}")


@pytest.mark.parametrize("name", ["threshold", "low_confidence"])
def test_the_prefix_cache_fills_the_spans(filled, name):
    tokens, nfe = infill(filled, samplers.get_sampler(name), cache="prefix")
    check_filled(filled, tokens, nfe, f"{name}/prefix")


def test_blocks_without_masks_cost_no_forward(filled):
    """One token per step: exactly one forward per masked position, none for the fully fixed first block."""
    _, tokenizer, _, _, _, _, template = filled
    tokens, nfe = infill(filled, samplers.LowConfidence())
    assert np.all(nfe == (template == tokenizer.mask_id).sum(-1))
    model, tokenizer, _, prompts, mask, answers, _ = filled
    only_last = answers.copy()
    only_last[:, 17:20] = tokenizer.mask_id  # the first two blocks fully fixed
    result = dllm.generate(model, prompts, samplers.LowConfidence(), gen_length=GEN, block_length=BLOCK,
                           tokenizer=tokenizer, attention_mask=mask, template=only_last)
    assert np.all(np.asarray(result.nfe) == (only_last == tokenizer.mask_id).sum(-1))


def test_a_row_fills_as_it_does_alone_and_steps_agree(filled):
    model, tokenizer, _, prompts, mask, _, template = filled
    keys = jax.random.split(jax.random.key(3), len(prompts))
    run = lambda rows: dllm.generate(model, prompts[rows], samplers.Threshold(tau=0.9), gen_length=GEN,
                                     block_length=BLOCK, tokenizer=tokenizer, attention_mask=mask[rows],
                                     template=template[rows], temperature=1.0, key=keys[rows])
    together = run(np.arange(len(prompts)))
    for row in (0, 3):
        alone = run(np.array([row]))
        np.testing.assert_array_equal(np.asarray(alone.tokens)[0], np.asarray(together.tokens)[row])
    stepped = list(steps(model, prompts[:2], samplers.Threshold(tau=0.9), gen_length=GEN, block_length=BLOCK,
                         tokenizer=tokenizer, attention_mask=mask[:2], template=template[:2], temperature=1.0,
                         key=keys[:2]))
    np.testing.assert_array_equal(stepped[-1].tokens, np.asarray(together.tokens)[:2])


VOCAB, MASK, EOS = 8, 7, 6
SPECIAL = SpecialIds(mask=MASK, eos=EOS, eot=EOS, pad=0)


def copy_left_neighbour(tokens, attention_mask):
    """A model as a bare function: each position proposes its left neighbour's token (masks propose
    token 1), more confidently further left. Nothing else: no config, no cache methods."""
    left = jnp.concatenate([tokens[:, :1], tokens[:, :-1]], axis=1)
    proposal = jnp.where(left == MASK, 1, left)
    return jax.nn.one_hot(proposal, VOCAB) * (30.0 - jnp.arange(tokens.shape[1]))[None, :, None]


def test_a_function_model_fills_uncached_and_refuses_caches():
    """By hand: prompt [3], template [4 M M 5 M M M M]: one token per step, left to right, each
    masked position copies its left neighbour once that is filled: 4 4 4 5 5 5 5 5."""
    template = [[4, MASK, MASK, 5, MASK, MASK, MASK, MASK]]
    result = dllm.generate(copy_left_neighbour, [[3]], samplers.LowConfidence(), gen_length=8, block_length=8,
                           special=SPECIAL, template=template)
    assert np.asarray(result.tokens).tolist() == [[4, 4, 4, 5, 5, 5, 5, 5]]
    assert np.asarray(result.nfe).tolist() == [6]
    with pytest.raises(ValueError, match=r"cache='dual' with a function model: it has no K/V to cache"):
        dllm.generate(copy_left_neighbour, [[3]], samplers.LowConfidence(), gen_length=8, block_length=8,
                      special=SPECIAL, template=template, cache="dual")
    with pytest.raises(ValueError, match=r"a function model has no config: pass tokenizer= or special="):
        dllm.generate(copy_left_neighbour, [[3]], samplers.LowConfidence(), gen_length=8, block_length=8)


@pytest.mark.parametrize("template, message", [
    ([[4, MASK, 5]], r"template shape \(1, 3\): must be \(batch, gen_length\) = \(1, 8\)"),
    ([[4, 5, 5, 5, 5, 5, 5, 5]], r"template has no mask token \(id 7\) to fill"),
    ([[4, MASK, 5, 9, 5, 5, 5, 5]], r"template ids must lie in \[0, 8\); found 4..9"),
    ([["a"] * 8], r"template must be int ids \[batch, gen_length\]"),
])
def test_bad_templates_are_refused(template, message):
    with pytest.raises(ValueError, match=message):
        dllm.generate(copy_left_neighbour, [[3]], samplers.LowConfidence(), gen_length=8, block_length=8,
                      special=SPECIAL, template=template)


def test_a_mask_in_the_prompt_points_to_the_template():
    with pytest.raises(ValueError, match=r"prompts must be fully observed \(to fill positions, give the generation "
                                         r"canvas as template="):
        dllm.generate(copy_left_neighbour, [[3, MASK]], samplers.LowConfidence(), gen_length=8, block_length=8,
                      special=SPECIAL)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_self_speculative_fills_with_the_stepwise_tokens(filled, temperature):
    """Its sampled canvases draw the noise of the stepwise step that reaches them, counted in tokens
    this decode committed (a template's fixed tokens not)."""
    stepwise, _ = infill(filled, samplers.LowConfidence(), temperature=temperature, key=jax.random.key(4))
    speculative, nfe = infill(filled, samplers.SelfSpeculative(), temperature=temperature, key=jax.random.key(4))
    np.testing.assert_array_equal(speculative, stepwise)
    _, tokenizer, *_, template = filled
    assert nfe.mean() < (template == tokenizer.mask_id).sum(-1).mean()


def test_a_block_causal_model_fills_uncached_and_refuses_the_block_cache():
    model, tokenizer = dllm.from_pretrained(REPO_ROOT / "checkpoints" / "tiny-block")
    example = next(e for e in suite_examples("test", 2) if e.task == "reverse")
    answer = (tokenizer.encode(example.answer) + [tokenizer.eos_id] * GEN)[:GEN]
    template = [answer[:3] + [tokenizer.mask_id] * 3 + answer[6:]]
    prompt = [tokenizer.encode(example.prompt)]
    result = dllm.generate(model, prompt, samplers.LowConfidence(), gen_length=GEN, block_length=BLOCK,
                           tokenizer=tokenizer, template=template, cache="none")
    tokens = np.asarray(result.tokens)[0]
    assert tokens[:3].tolist() == answer[:3] and tokens[6:].tolist() == answer[6:]
    assert tokenizer.mask_id not in tokens.tolist() and int(result.nfe[0]) == 3
    for cache in ("block", "auto"):  # auto: the block cache for this model
        with pytest.raises(ValueError, match=r"template= with cache='block': a fully fixed block is skipped"):
            dllm.generate(model, prompt, samplers.LowConfidence(), gen_length=GEN, block_length=BLOCK,
                          tokenizer=tokenizer, template=template, cache=cache)


def test_refused_pairs_with_a_template(filled):
    model, tokenizer, _, prompts, mask, _, template = filled
    run = lambda sampler, t=template: dllm.generate(model, prompts, sampler, gen_length=GEN, block_length=BLOCK,
                                                    tokenizer=tokenizer, attention_mask=mask, template=t)
    with pytest.raises(ValueError, match=r"template= with EndOfText: its end-of-text prediction writes EOS"):
        run(samplers.get_sampler("end_of_text"))
    with pytest.raises(ValueError, match=r"Dingo.pattern='\[5-9\]\+': no answer matches it with the fixed tokens "
                                         r"of template row\(s\) \[0, 1, 2"):
        run(samplers.Dingo(pattern="[5-9]+"))
    with pytest.raises(ValueError, match=r"Dingo wraps SelfSpeculative, which verifies draft canvases"):
        run(samplers.Dingo(pattern=".*", inner=samplers.SelfSpeculative()))
