"""Learn2PD: oracle data, the filter's trainer, the LearnedFilter sampler and end-of-text prediction.

Expected values come from hand-worked examples: fake models whose logits are
written out per position, and a hand-set filter whose acceptance rule is
"confidence > 0.684" (worked out below), never from the code under test.
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

import dllm
from dllm import evaluation
import samplers.learned_filter as ft
from dllm.decoding import DecodeConfig, SpecialIds
from dllm.decoding.engine import initial_state, pad_prompts
from dllm.tasks import get_task, suite_examples
from experiments.common import REPO_ROOT
from samplers.end_of_text import EndOfText
from samplers.learned_filter import DEFAULT_FILTER, LearnedFilter
from samplers.low_confidence import LowConfidence
from samplers.threshold import Threshold

# Vocabulary of the fake models: pad 0, EOS 1, MASK 2, ordinary tokens 3..7.
V, EOS, MASK = 8, 1, 2
A, B, X, E, D = 3, 4, 5, 6, 7
SPECIAL = SpecialIds(mask=MASK, eos=EOS, eot=EOS, pad=0)
TINY_CONFIG = dllm.ModelConfig(vocab_size=V, d_model=8, n_layers=1, n_heads=1, mlp_hidden=8, max_seq_len=64)


def log_dist(token, c):
    """Log-probabilities: c on `token`, the rest spread evenly over the other 6 non-mask tokens."""
    p = np.full(V, (1.0 - c) / 6)
    p[MASK] = 0.0
    p[token] = c
    with np.errstate(divide="ignore"):
        return jnp.asarray(np.log(p), jnp.float32)


# ------------------------------------------------------------------ oracle data


class StallModel(nnx.Module):
    """Three generation positions whose predictions depend on the canvas:

    pos 0: A (p 0.99), always;
    pos 1: E (0.5) while pos 0 is masked; B (0.95) once pos 0 is set and
           pos 2 still masked; D (0.95) once pos 2 is set;
    pos 2: X (0.9), always.

    Reference (one token per step): A first (0.99), then B (0.95 > 0.9), then
    X: [A, B, X]. EGP oracle: step 0 sees [A, E, X], commits pos 0 and 2;
    step 1 sees pos 1 = D != B: no masked position is right, so the reference
    is copied (a stall). Two oracle steps.
    """

    def __init__(self):
        self.config = TINY_CONFIG

    def __call__(self, tokens, attention_mask=None, *, logits_start=0, logits_length=None, logits_offsets=None):
        g = tokens[:, -3:]
        masked = g == MASK
        batch = tokens.shape[0]
        pos0 = jnp.broadcast_to(log_dist(A, 0.99), (batch, V))
        pos1 = jnp.where(masked[:, :1], log_dist(E, 0.5), jnp.where(masked[:, 2:3], log_dist(B, 0.95),
                                                                      log_dist(D, 0.95)))
        pos2 = jnp.broadcast_to(log_dist(X, 0.9), (batch, V))
        return jnp.stack([pos0, pos1, pos2], axis=1)


def test_oracle_records_labels_and_stall_by_hand():
    config = DecodeConfig(gen_length=3, block_length=3)
    out = ft.decode_oracle_batch(StallModel(), [[4]], [[1]], config, SPECIAL, LowConfidence())
    np.testing.assert_array_equal(out["reference"], [[A, B, X]])
    # Independent route: the engine with the LowConfidence sampler gives the same reference.
    engine = dllm.generate(StallModel(), [[4]], LowConfidence(), gen_length=3, block_length=3, special=SPECIAL)
    np.testing.assert_array_equal(out["reference"], np.asarray(engine.tokens))
    assert out["reference_nfe"].tolist() == [3] and out["oracle_nfe"].tolist() == [2]
    r = {k: v[:, 0] for k, v in out["records"].items()}  # row 0, [steps, ...]
    assert r["active"].tolist() == [True, True, False]
    np.testing.assert_array_equal(r["correct"][:2], [[1, 0, 1], [1, 0, 1]])  # pos 1: E, then D, never B
    np.testing.assert_array_equal(r["masked"][:2], [[1, 1, 1], [0, 1, 0]])
    assert r["stalled"][:2].tolist() == [False, True]
    np.testing.assert_allclose(r["confidence"][0], [0.99, 0.5, 0.9], rtol=1e-5)
    np.testing.assert_allclose(r["confidence"][1], [0.99, 0.95, 0.9], rtol=1e-5)
    np.testing.assert_allclose(r["progress"][:2], [0.0, 2 / 3], atol=1e-6)
    # Argmax canvas of the reference run: [A, E, X], then [A, B, X] twice: settled after pass 2.
    np.testing.assert_array_equal(out["canvases"][:, 0], [[A, E, X], [A, B, X], [A, B, X]])
    assert ft.settled_steps(out["canvases"][:, 0], out["reference"][0], 3, SPECIAL) == (2, 2)


def test_settled_steps_first_and_stable():
    final = np.array([A, B, EOS, EOS])
    canvases = np.array([[A, B, EOS, X],      # answer (up to EOS) already right: pass 1
                         [A, X, EOS, EOS],    # wrong again
                         [A, B, EOS, A],      # right from pass 3 on
                         [A, B, EOS, EOS]])
    assert ft.settled_steps(canvases, final, 4, SPECIAL) == (1, 3)


# ------------------------------------------------------------------ training


def synthetic_data(n_examples=200, steps=4, block=8, seed=0) -> ft.OracleData:
    """Records where a position is right iff its confidence > 0.7 (with 5% label noise)."""
    rng = np.random.default_rng(seed)
    n = n_examples * steps
    confidence = rng.uniform(0, 1, (n, block)).astype(np.float32)
    correct = (confidence > 0.7) ^ (rng.uniform(size=(n, block)) < 0.05)
    records = {"confidence": confidence, "entropy": (1 - confidence).astype(np.float32),
               "masked": rng.uniform(size=(n, block)) < 0.7, "correct": correct,
               "progress": rng.uniform(size=n).astype(np.float32), "step_fraction": np.zeros(n, np.float32),
               "example": np.repeat(np.arange(n_examples), steps).astype(np.int32)}
    examples = {"task": np.array(["synthetic"] * n_examples)}
    return ft.OracleData(records, examples, {"gen_length": 24, "block_length": block})


def test_training_lowers_bce_and_round_trips(tmp_path):
    data = synthetic_data()
    config = ft.FilterTrainConfig(steps=600, eval_every=50, patience=4, masked_only=True)
    result = ft.train_filter(data, ("confidence", "masked"), None, config, log=lambda s: None)
    first, kept = result.history[0], result.history[result.best_step // 50]
    assert kept["train_bce"] < 0.7 * first["train_bce"], result.history
    assert result.metrics["val"]["bce"] == pytest.approx(kept["val_bce"], rel=1e-4)  # the best check is kept
    assert kept["val_bce"] < 0.7 * first["val_bce"], result.history
    assert result.metrics["test"]["bce"] < 0.7 * first["val_bce"], result.metrics
    # Saved with orbax + filter.json; the loaded filter computes the same logits.
    path = ft.save_filter(tmp_path / "f", result.mlp, {"note": "synthetic"})
    weights = ft.load_filter(path)
    assert (weights.block_length, weights.features, weights.hidden) == (8, ("confidence", "masked"), 16)
    x = jnp.asarray(np.random.default_rng(1).uniform(size=(5, 8, 2)), jnp.float32)
    np.testing.assert_allclose(np.asarray(weights.mlp()(x)), np.asarray(result.mlp(x)), rtol=1e-6, atol=1e-6)
    # Hashable, and equal only with the same weights (a jit static must not share compiled loops wrongly).
    a, b = LearnedFilter(str(path)), LearnedFilter(str(path))
    assert a == b and hash(a) == hash(b)
    other = ft.save_filter(tmp_path / "g", hand_set_filter(), {})
    assert LearnedFilter(str(other)) != a


def hand_set_filter(block=8) -> ft.FilterMLP:
    """logit_i = relu(20 c_i - 10) - 0.5, position by position.

    sigmoid(logit) > 0.96  <=>  logit > ln(24) = 3.178  <=>  c > (3.178 + 0.5 + 10) / 20 = 0.684,
    so at accept_threshold 0.96 it accepts exactly the positions with confidence > 0.684.
    """
    eye = np.eye(block, dtype=np.float32)
    params = {"hidden": {"kernel": 20 * eye, "bias": np.full(block, -10.0, np.float32)},
              "out": {"kernel": eye, "bias": np.full(block, -0.5, np.float32)}}
    return ft.FilterMLP.from_params(params, block, ("confidence",), block)


@pytest.fixture(scope="module")
def hand_filter(tmp_path_factory):
    return str(ft.save_filter(tmp_path_factory.mktemp("filters") / "hand", hand_set_filter(), {}))


# ------------------------------------------------------------------ the commit rule


def make_state(gen_tokens, block_start, block_length=8):
    gen = jnp.asarray(gen_tokens, jnp.int32)
    batch, g = gen.shape
    config = DecodeConfig(gen_length=g, block_length=block_length)
    prompt = jnp.full((batch, 2), A, jnp.int32)
    state = initial_state(prompt, jnp.ones_like(prompt), jax.random.key(0), config, SPECIAL)
    start = jnp.asarray(block_start, jnp.int32)
    return state.replace(tokens=state.tokens.at[:, 2:].set(gen), block_start=start,
                         block_end=jnp.minimum(start + block_length, g))


def test_learned_filter_commit_rule_by_hand(hand_filter):
    M = MASK
    state = make_state([[M] * 16, [A] * 9 + [M] * 7], block_start=[0, 8])
    row0 = [.97, .6, .8, .5, .3, .99, .7, .2] + [.99] * 8           # window [0, 8); .99 outside never
    row1 = [.99] * 8 + [.99, .5, .5, .5, .6, .5, .5, .5]             # window [8, 16); position 8 decoded
    logits = jnp.stack([jnp.stack([log_dist(A, c) for c in row]) for row in (row0, row1)])
    sampler = LearnedFilter(hand_filter)
    commit, _ = jax.jit(sampler.step)(logits, state, sampler.init(state))
    got = ["".join("1" if c else "." for c in row) for row in np.asarray(commit.commit)]
    # Row 0: .97 .8 .99 .7 exceed 0.684 (the top-1, .99, is among them). Row 1: none does:
    # only the top-1 of the masked window positions, .6 at 12.
    assert got == ["1.1..11.........", "............1..."]
    assert commit.truncate_at is None


# ------------------------------------------------------------------ end-of-text prediction


class EosModel(nnx.Module):
    """Static logits over 24 positions: token A at p 0.97 everywhere, except
    row i's EOS proposals `eos[i]` = {position: probability}."""

    def __init__(self, eos):
        self.config = TINY_CONFIG
        self.eos = tuple(tuple(sorted(row.items())) for row in eos)  # static, so hashable

    def __call__(self, tokens, attention_mask=None, *, logits_start=0, logits_length=None, logits_offsets=None):
        rows = []
        for b, spec in enumerate(map(dict, self.eos)):
            table = jnp.stack([log_dist(EOS, spec[j]) if j in spec else log_dist(A, 0.97) for j in range(24)])
            start = 0 if logits_offsets is None else logits_offsets[b]  # window-only samplers: row b's block
            rows.append(jax.lax.dynamic_slice_in_dim(table, start, logits_length))
        return jnp.stack(rows)


def decode(model, sampler, n_rows):
    return dllm.generate(model, [[A]] * n_rows, sampler, gen_length=24, block_length=8, special=SPECIAL)


@pytest.mark.parametrize("sampler", ["threshold", "low_confidence", "learned_filter"])
def test_end_of_text_never_decodes_past_the_chosen_eos(sampler, hand_filter):
    """Row 0 proposes EOS only at 5 (p 0.4), row 1 only at 13. The cut is made at
    step 0; everything after it is EOS with commit step 0, including positions
    6 and 7 that Threshold(0.9) / the filter commit as A at that very step
    (those commits are dropped). The EOS position itself is decoded later."""
    eos_at = (5, 13)
    model = EosModel([{5: 0.4}, {13: 0.4}])
    sampler = {"threshold": EndOfText(inner=Threshold(tau=0.9)), "low_confidence": EndOfText(),
               "learned_filter": LearnedFilter(hand_filter, eot_prediction=True)}[sampler]
    result = decode(model, sampler, 2)
    tokens, steps = np.asarray(result.tokens), np.asarray(result.trace.commit_step)
    for row, p in enumerate(eos_at):
        assert np.all(tokens[row, p + 1:] == EOS), tokens[row]
        assert np.all(steps[row, p + 1:] == 0), steps[row]  # cut at step 0, never committed before or after
        assert np.all(tokens[row, :p] == A) and tokens[row, p] == EOS, tokens[row]
        assert np.all(steps[row, :p + 1] >= 0)
    assert not np.any(tokens == MASK)
    assert np.asarray(result.nfe).max() < 24


def test_accepted_eos_wins_over_the_most_confident(hand_filter):
    """EOS proposed at 3 (p 0.8, in the first window) and at 20 (p 0.99).

    LearnedFilter + EoTP: the filter accepts 0.8 > 0.684, so the cut is at 3
    and the row is done in one step.

    EndOfText(LowConfidence): steps 0..6 commit the A's of the first window
    one by one (p 0.97, lower position first), no EOS, so the cut is the most
    confident EOS proposal, 20: 21..23 are EOS from step 0. Step 7 commits the
    EOS at 3 (p 0.8): a committed EOS, so the cut moves to 3 and 8..20 become
    EOS at step 7 (the earlier cut wins). Eight forwards in all.
    """
    model = EosModel([{3: 0.8, 20: 0.99}])
    filtered = decode(model, LearnedFilter(hand_filter, eot_prediction=True), 1)
    np.testing.assert_array_equal(np.asarray(filtered.tokens)[0], [A, A, A, EOS] + [EOS] * 20)
    assert np.asarray(filtered.nfe).tolist() == [1]
    baseline = decode(model, EndOfText(inner=LowConfidence()), 1)
    tokens, steps = np.asarray(baseline.tokens)[0], np.asarray(baseline.trace.commit_step)[0]
    np.testing.assert_array_equal(tokens, [A, A, A, EOS, A, A, A, A] + [EOS] * 16)
    np.testing.assert_array_equal(steps, [0, 1, 2, 7, 3, 4, 5, 6] + [7] * 13 + [0] * 3)
    assert np.asarray(baseline.nfe).tolist() == [8]


def test_without_eot_prediction_there_is_no_cut(hand_filter):
    """Same logits as row 0 above, no EoTP: the A's after the EOS at 5 are decoded
    (6, 7 at step 0 with the first window, the other blocks later)."""
    result = decode(EosModel([{5: 0.4}]), LearnedFilter(hand_filter), 1)
    tokens, steps = np.asarray(result.tokens)[0], np.asarray(result.trace.commit_step)[0]
    assert np.all(tokens[6:] == A) and tokens[5] == EOS
    assert steps[8:].min() > 0 and np.asarray(result.nfe).tolist() == [4]


# ------------------------------------------------------------------ the bundled model and filter


def test_learned_filter_on_the_trained_model():
    """The committed filter decodes held-out prompts correctly in far fewer forwards than gen_length."""
    model, tokenizer = dllm.from_pretrained(REPO_ROOT / "checkpoints" / "tiny-tasks")
    examples = suite_examples("test", 2)  # 2 held-out prompts of each of the 10 tasks
    tokens, mask = pad_prompts([tokenizer.encode(e.prompt) for e in examples], tokenizer.pad_id, 24)
    for eot in (False, True):
        result = dllm.generate(model, tokens, LearnedFilter(eot_prediction=eot), gen_length=24, block_length=8,
                               tokenizer=tokenizer, attention_mask=mask)
        outputs = [evaluation.answer_text(tokenizer, row) for row in np.asarray(result.tokens)]
        scores = [get_task(e.task).score(e, out) for e, out in zip(examples, outputs)]
        assert np.mean(scores) >= 0.9, (eot, list(zip(outputs, scores)))
        assert np.asarray(result.nfe).mean() < 8, (eot, np.asarray(result.nfe))


def test_committed_filter_records_its_settings():
    weights = ft.load_filter(DEFAULT_FILTER)
    assert weights.block_length == 8 and weights.features == ("confidence",)
    header = json.loads((ft.resolve_filter_path(DEFAULT_FILTER) / "filter.json").read_text())
    assert header["oracle_settings"]["block_length"] == 8 and header["oracle_settings"]["split"] == "train"
    assert header["metrics"]["test"]["precision"] > 0.9


# ------------------------------------------------------------------ configs and bad input


def test_configs_build():
    sampler = instantiate(OmegaConf.load(REPO_ROOT / "configs/sampler/learned_filter.yaml"), _convert_="all")
    assert isinstance(sampler, LearnedFilter) and sampler.accept_threshold == 0.96
    sampler.validate(DecodeConfig(gen_length=24, block_length=8))
    with initialize_config_dir(config_dir=str(REPO_ROOT / "configs"), version_base=None):
        cfg = OmegaConf.to_container(compose(config_name="train_filter"), resolve=True)
    oracle = {k: v for k, v in cfg["oracle"].items() if k != "reuse"}
    assert ft.OracleConfig(**oracle).block_length == 8
    assert ft.FilterTrainConfig(**cfg["train"]).accept_threshold == 0.96
    ft.check_features(cfg["filter"]["features"])
    assert cfg["filter_path"] == "runs/train_filter/filter"  # its run folder, never the bundled filter by default


def test_bad_input(tmp_path, hand_filter):
    for bad in (0, 1, 1.5, -0.2, True, "0.9"):
        with pytest.raises(ValueError, match=r"accept_threshold=.*allowed range \(0, 1\)"):
            LearnedFilter(hand_filter, accept_threshold=bad)
    missing = tmp_path / "no_such_filter"
    with pytest.raises(FileNotFoundError, match="no_such_filter"):
        LearnedFilter(str(missing))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="filter.json"):
        LearnedFilter(str(tmp_path / "empty"))
    small = ft.save_filter(tmp_path / "block4", ft.FilterMLP(4, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=r"trained for block_length=4.*decode uses block_length=8"):
        dllm.generate(StallModel(), [[A]], LearnedFilter(str(small)), gen_length=24, block_length=8,
                      special=SPECIAL)
    with pytest.raises(ValueError, match="unknown feature 'logits'"):
        ft.FilterMLP(8, ("confidence", "logits"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="at least one per-position feature"):
        ft.check_features(("progress",))
    with pytest.raises(ValueError, match="OracleConfig.split='dev'"):
        ft.OracleConfig(split="dev")
    with pytest.raises(ValueError, match="val_fraction"):
        ft.FilterTrainConfig(val_fraction=0.7)
    with pytest.raises(ValueError, match="EndOfText.inner"):
        EndOfText(inner="threshold")
    assert dataclasses.replace(LearnedFilter(hand_filter), accept_threshold=0.5).accept_threshold == 0.5
