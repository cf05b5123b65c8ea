"""Small builders shared by the tests (not a test module)."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import dllm
from dllm.decoding import DecodeConfig, SpecialIds
from dllm.decoding.engine import initial_state


def tiny_random_model(vocab=40, mask=39, eos=38, pad=0, seed=0):
    """A 2-layer random LLaDA-style model whose logits are spread away from ties
    (a fresh init is near uniform, which would make confidence rankings fragile)."""
    config = dllm.ModelConfig(vocab_size=vocab, d_model=32, n_layers=2, n_heads=4, mlp_hidden=64,
                              max_seq_len=64, mask_token_id=mask, eos_token_id=eos, pad_token_id=pad)
    model = dllm.Transformer(config, rngs=nnx.Rngs(seed))
    model.lm_head[...] = model.lm_head[...] * 40.0
    return model


def make_state(gen_tokens, block_start, block_end, *, special: SpecialIds, block_length, step=0, step_in_block=0,
               **config):
    """A DecodeState with the given generation canvas and windows (prompt: 2 tokens)."""
    gen = jnp.asarray(gen_tokens, jnp.int32)
    batch, g = gen.shape
    config = DecodeConfig(gen_length=g, block_length=block_length, **config)
    prompt = jnp.ones((batch, 2), jnp.int32)
    state = initial_state(prompt, jnp.ones_like(prompt), jax.random.key(0), config, special)
    as_row = lambda v: jnp.broadcast_to(jnp.asarray(v, jnp.int32), (batch,))
    return state.replace(tokens=state.tokens.at[:, 2:].set(gen), block_start=as_row(block_start),
                         block_end=as_row(block_end), step_in_block=as_row(step_in_block),
                         step=jnp.asarray(step, jnp.int32), nfe=as_row(step))  # rows that started with the batch


def logits_of(rows):
    """Logits whose softmax is exactly the given probability rows (0 -> -inf)."""
    with np.errstate(divide="ignore"):
        return jnp.asarray(np.log(np.asarray(rows, np.float64)), jnp.float32)


def marks(*rows):
    """'1' = committed, '.' = not: one string per batch row."""
    return np.array([[c == "1" for c in row] for row in rows])


def top(c, token=0):
    """Probabilities over 6 tokens (4 ordinary, then EOS and MASK at 0): c on
    `token`, the rest spread evenly over the other three ordinary tokens."""
    p = [(1.0 - c) / 3] * 4 + [0.0, 0.0]
    p[token] = c
    return p


def refusal(sampler, **decode_fields) -> str | None:
    """The ValueError text with which `sampler` refuses these decode settings (`Sampler.validate`),
    or None when it runs them: the grids decode the pairs a sampler accepts and assert that the
    engine refuses the others, so no pair is skipped silently."""
    fields = {"gen_length": 16, "block_length": 8, **decode_fields}
    try:
        sampler.validate(DecodeConfig(**fields))
    except ValueError as error:
        return str(error)
    return None


def numbered_tokenizer(vocab_size: int, special: SpecialIds):
    """A word-level tokenizer for a random test model's ids: token i reads "t<i>", the specials
    their own names (what a sampler that compiles token texts, DINGO, binds to)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    names = {special.mask: "<mask>", special.eos: "<eos>", special.eot: "<eos>", special.pad: "<pad>"}
    vocab = {names.get(i, f"t{i}"): i for i in range(vocab_size)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in set(names.values())])
    return dllm.Tokenizer(backend, mask_id=special.mask, eos_id=special.eos, eot_id=special.eot, pad_id=special.pad)


def registered_samplers(delimiter_id: int, answer_delimiter_id: int = 3, vocab_size: int = 40,
                        special: SpecialIds = SpecialIds(mask=39, eos=38, eot=38, pad=0)) -> dict:
    """Every registered sampler (configs/sampler/*.yaml) with its YAML defaults; the token texts
    of the task-suite YAMLs given as ids of the test's vocabulary, and the samplers that compile
    token texts (DINGO) bound to `numbered_tokenizer(vocab_size, special)`."""
    from dllm.decoding.sampler import build_sampler, sampler_names

    ids = {"early_commit": {"answer_delimiter_id": answer_delimiter_id},
           "adaptive_block": {"delimiter_ids": [delimiter_id]}}
    built = {name: build_sampler(name, **ids.get(name, {})) for name in sampler_names()}
    built["dingo"] = built["dingo"].bind(numbered_tokenizer(vocab_size, special))
    return built


# The trained-model decoding grids (batch invariance, the block cache): five task prompts, four of 11
# tokens and one of 15, so a batch of five is left-padded, and the registry's samplers plus two
# compositions that the registry's YAMLs do not spell out.
GRID_PROMPTS = [
    "reverse : Ann Bob Cid Dan Eve Fay Gus Hal =>",
    "sort : Hal Eve Ann Gus Bob Fay Dan Cid =>",
    "shuffle : Ann Bob Cid Dan Eve Fay Gus Ivy =>",
    "copy : Kim Lou Max Ned Oli Pam Quin Ray =>",
    "insert Zoe at 3 : Sam Tom Uma Val Wes Ann Bob Cid Dan =>",
]


def grid_sampler_specs(exclude=()) -> dict:
    """{name: Hydra spec}: every registered sampler's YAML (but `exclude`), low_confidence with random
    remasking, and end_of_text around threshold 0.9."""
    from dllm.decoding.sampler import sampler_names, sampler_spec

    specs = {name: sampler_spec(name) for name in sampler_names() if name not in exclude}
    specs["low_confidence_random"] = {"_target_": "samplers.low_confidence.LowConfidence", "remasking": "random"}
    specs["end_of_text"] = {"_target_": "samplers.end_of_text.EndOfText",
                            "inner": {"_target_": "samplers.threshold.Threshold", "tau": 0.9}}
    return specs
