"""DINGO: constrained decoding, the most probable canvas a regular expression accepts.

Suresh, Banerjee, Ugare, Misailovic, Singh 2025, "DINGO: Constrained Inference for Diffusion LLMs"
(arXiv 2505.23061), §3-4, Algorithm 1. The regular expression R is compiled to a character DFA
(`interegular`, the parser Outlines uses) and lifted to tokens: delta(q, t) runs the DFA over the
token's text, and the mask token (bottom) moves q to every state one ordinary token reaches
(delta(q, bottom), the paper's mask transition). Given the model's distributions v_i, the dynamic
programme W[i, q] = max over (q', t) with delta(q', t) = q of W[i-1, q'] * v_i[t] (Eq. 2, in logs)
finds the partially masked string of highest probability that the DFA can still take to acceptance,
and a backtrack reads it off.

Here, per decoding step: the inner sampler (default LLaDA's low-confidence rule) chooses which
positions commit, from the unconstrained confidences; at those positions v_i is the model's
distribution, at positions committed earlier a point mass on their token, and at the positions left
masked a point mass on bottom. DINGO then writes the tokens of the best accepted string at the
committing positions. The whole generation canvas is in the programme, so blocks after the active
one are wildcards.

Deviations, named:
- Acceptance, not a valid prefix: the paper keeps the block's end state live (some continuation
  accepted); here the canvas has a fixed length, so the programme requires the end state to accept
  R followed by EOS padding (EOS or EOT, once any is written, only EOS/EOT follow). The output is
  then a complete match whenever the decode finishes, never a prefix cut by the canvas end.
- Positions: the paper decodes a block's positions with the model's distribution directly; here the
  inner rule picks them (the unmasking schedule stays the sampler's).
- Temperature > 0: the programme maximises the Gumbel-perturbed logits the inner rule samples from
  (perturb-and-MAP), so with a pattern that accepts everything it commits the inner's own draws.
- Logits of -inf (an EOS policy) are floored at -1e9: the constraint wins when only such a token
  is allowed.
- Tokens whose text is empty (special tokens other than EOS/EOT) are never allowed; so are tokens
  whose text alone is not valid text (a byte-level token holding part of a UTF-8 character decodes
  to U+FFFD).
- Infilling (`generate(template=)`): one pattern over the whole answer, fixed spans included (the
  paper constrains each decoded block); a template no accepted answer fits is refused up front.

Cost: the tables are [S, V] per pattern (built vectorised over states), and each step scans the G
positions over S x V entries; for a 126k-token vocabulary and hundreds of states that is large.
"""

from __future__ import annotations

import dataclasses
import hashlib

import jax
import jax.numpy as jnp
import numpy as np

from dllm.decoding.state import DecodeConfig, DecodeState
from samplers import base

FLOOR = -1e9  # a chosen token scored below this (-inf: an EOS policy's) counts as floored


def default_inner():
    from samplers.low_confidence import LowConfidence

    return LowConfidence()


class TokenAutomaton:
    """A regular expression lifted to a tokenizer's tokens (host arrays; hashed by content, so
    the compiled decode of one pattern and tokenizer is reused and never another's).

    States 0..n-1 are the character DFA's, then END (an EOS was written) and DEAD.
    Attributes:
      first, after: int32 [S, V], the state after a token at the first / a later generation position
        (a later token's text carries the separator the tokenizer puts before it).
      ordinary: bool [V], the tokens the mask can stand for (all but mask and pad): the mask moves q
        to every first/after[q, t] of an ordinary t.
      initial: the start state; accepting: bool [S].
    """

    def __init__(self, pattern: str, first, after, ordinary, initial: int, accepting):
        self.pattern, self.initial = pattern, int(initial)
        self.first, self.after = np.asarray(first, np.int32), np.asarray(after, np.int32)
        self.ordinary, self.accepting = np.asarray(ordinary, bool), np.asarray(accepting, bool)
        digest = hashlib.sha1(pattern.encode())
        for table in (self.first, self.after, self.ordinary, self.accepting):
            digest.update(table.tobytes())
        digest.update(f"{self.initial} {self.first.shape}".encode())
        self.digest = digest.hexdigest()

    def __eq__(self, other):
        return isinstance(other, TokenAutomaton) and other.digest == self.digest

    def __hash__(self):
        return hash(self.digest)

    def __repr__(self):
        return f"TokenAutomaton({self.pattern!r}, {self.first.shape[0]} states)"

    @property
    def dead(self) -> int:
        return self.first.shape[0] - 1

    def shortest_match(self) -> int | None:
        """The fewest tokens of an accepted generation (EOS padding not counted), or None."""
        frontier, seen, length = {self.initial}, {self.initial}, 0
        table = self.first
        while frontier:
            if any(self.accepting[q] for q in frontier):
                return length
            nxt = {int(q2) for q in frontier for q2 in np.unique(table[q])} - seen - {self.dead}
            seen |= nxt
            frontier, table, length = nxt, self.after, length + 1
        return None


def token_texts(tokenizer) -> tuple[list[str], list[str]]:
    """(text of each token at the first position, text of each token after another one): the
    second is decode([r, t]) less decode([r]) for an ordinary token r, so it carries the
    separator a word-level tokenizer writes between tokens (and nothing for byte-level BPE)."""
    size = base.vocabulary_size(tokenizer)
    first = [tokenizer.decode([t]) for t in range(size)]
    reference = next((t for t in range(size) if first[t]), None)
    if reference is None:
        raise ValueError(f"DINGO: no token of {tokenizer!r} decodes to any text")
    head = first[reference]
    after = []
    for t in range(size):
        both = tokenizer.decode([reference, t])
        if not both.startswith(head):
            raise ValueError(f"DINGO: decode([{reference}, {t}]) = {both!r} does not start with decode([{reference}]) "
                             f"= {head!r}; this tokenizer's texts do not concatenate, so a token's text is undefined")
        after.append(both[len(head):])
    return first, after


def compile_pattern(pattern: str, tokenizer) -> TokenAutomaton:
    """R (Python `re` syntax, matched against the whole decoded answer) lifted to `tokenizer`."""
    import interegular

    if not isinstance(pattern, str) or not pattern:
        raise ValueError(f"Dingo.pattern={pattern!r}: must be a non-empty regular expression")
    try:
        fsm = interegular.parse_pattern(pattern).to_fsm()
    except Exception as error:  # interegular raises its own parse errors
        raise ValueError(f"Dingo.pattern={pattern!r} does not parse as a regular expression "
                         f"({type(error).__name__}: {error})") from error
    states = sorted(fsm.states)
    index = {q: i for i, q in enumerate(states)}
    end, dead = len(states), len(states) + 1
    size = dead + 1
    finals = np.zeros(size, bool)
    finals[[index[q] for q in fsm.finals]] = True

    # the character DFA as an array [states + 1, symbols] (the extra row: dead), run for all states at once
    n_symbols = len(fsm.alphabet.by_transition)
    step = np.full((len(states) + 1, n_symbols), len(states), np.int32)
    for q, moves in fsm.map.items():
        for symbol, q2 in moves.items():
            step[index[q], symbol] = index[q2]
    everyone = np.arange(len(states))

    def run(text: str) -> np.ndarray:
        now = everyone
        for char in text:
            now = step[now, fsm.alphabet[char]]
        return np.where(now == len(states), dead, now)

    specials = tokenizer.special_ids
    stops = {specials["eos"], specials["eot"]}
    never = {specials["mask"], specials["pad"]} - stops
    first_text, after_text = token_texts(tokenizer)
    vocab = len(first_text)
    tables = []
    for texts in (first_text, after_text):
        table = np.full((size, vocab), dead, np.int32)
        for t, text in enumerate(texts):
            if t in stops:
                table[finals, t] = end
                table[end, t] = end
            elif t in never or not text:
                continue
            else:
                table[:len(states), t] = run(text)
        tables.append(table)
    ordinary = np.array([t not in never for t in range(vocab)])
    accepting = finals.copy()
    accepting[end] = True
    return TokenAutomaton(pattern, tables[0], tables[1], ordinary, index[fsm.initial], accepting)


def best_accepted(scores, choose, wildcard, fixed_tokens, automaton: TokenAutomaton, mask_id: int):
    """One row's dynamic programme (DINGO Algorithm 1). `scores` float [G, V]: the log-probabilities
    (or logits) of the positions that choose; `choose` / `wildcard` bool [G]: positions whose token
    the programme picks / that stay masked (the rest hold `fixed_tokens` int32 [G]).
    A chosen token scored -inf (or below FLOOR: an EOS policy's) is allowed but ranks after every
    path with fewer such tokens: paths compare by that count first, then by score.
    Returns (tokens int32 [G], the mask id at wildcards; feasible bool: some accepted string exists)."""
    size, vocab = automaton.first.shape
    dead = automaton.dead
    g = scores.shape[0]
    if scores.shape[1] < vocab:
        raise ValueError(f"DINGO: logits over {scores.shape[1]} tokens, the tokenizer has {vocab}")
    scores = scores[:, :vocab]  # tokens past the tokenizer's vocabulary are never allowed
    first, after = jnp.asarray(automaton.first), jnp.asarray(automaton.after)
    any_ordinary = jnp.where(jnp.asarray(automaton.ordinary), 0.0, -jnp.inf)  # a mask: any ordinary token
    token_ids = jnp.arange(vocab)
    flat_index = jnp.arange(size * vocab, dtype=jnp.int32)
    big = jnp.int32(size * vocab)

    never = jnp.int32(g + 1)  # a floored count above any path's: unreachable

    def forward(carry, j):
        best, floored = carry  # per state: the best path's score and its count of floored tokens
        table = jnp.where(j == 0, first, after)
        fixed_row = jnp.where(token_ids == fixed_tokens[j], 0.0, -jnp.inf)
        low = choose[j] & (scores[j] < FLOOR)
        row = jnp.where(choose[j], jnp.where(low, 0.0, scores[j]), jnp.where(wildcard[j], any_ordinary, fixed_row))
        by_score = (best[:, None] + row[None, :]).reshape(-1)  # [S * V], to state table[q, t]
        by_count = (floored[:, None] + low[None, :]).reshape(-1)
        target = table.reshape(-1)
        by_count = jnp.where(jnp.isfinite(by_score), by_count, never)
        count = jax.ops.segment_min(by_count, target, num_segments=size)
        fewest = (by_count == count[target]) & (by_count < never)
        new = jax.ops.segment_max(jnp.where(fewest, by_score, -jnp.inf), target, num_segments=size)
        hit = fewest & (by_score == new[target])
        arg = jax.ops.segment_min(jnp.where(hit, flat_index, big), target, num_segments=size)
        token = jnp.where(wildcard[j], mask_id, arg % vocab)  # a wildcard stays masked
        return (new.at[dead].set(-jnp.inf), count.at[dead].set(never)), (arg // vocab, token)

    start = (jnp.full((size,), -jnp.inf).at[automaton.initial].set(0.0),
             jnp.full((size,), never, jnp.int32).at[automaton.initial].set(0))
    (final, floored), (previous, tokens) = jax.lax.scan(forward, start, jnp.arange(g))
    accepting = jnp.asarray(automaton.accepting) & (floored < never)
    feasible = jnp.any(accepting)
    fewest = accepting & (floored == jnp.min(jnp.where(accepting, floored, never)))
    final = jnp.where(fewest, final, -jnp.inf)

    def backward(state, j):
        return previous[j, state], tokens[j, state]

    _, out = jax.lax.scan(backward, jnp.argmax(final).astype(jnp.int32), jnp.arange(g), reverse=True)
    return out.astype(jnp.int32), feasible


@dataclasses.dataclass(frozen=True)
class Dingo(base.Sampler):
    """The inner rule's positions, with the tokens of the most probable canvas `pattern` accepts.

    Attributes:
      pattern: a regular expression (Python `re` syntax) the decoded answer must match in whole,
        EOS padding after it. Compiled for the tokenizer when bound (`generate(..., tokenizer=)`).
      inner: the rule that picks the positions to commit (default LowConfidence(), LLaDA's).
      automaton: filled by `bind`; leave unset.
    """

    pattern: str | None = None
    inner: base.Sampler = dataclasses.field(default_factory=default_inner)
    automaton: TokenAutomaton | None = None
    name = "dingo"  # registry name: configs/sampler/dingo.yaml

    def __post_init__(self):
        if not isinstance(self.inner, base.Sampler):
            raise ValueError(f"Dingo.inner={self.inner!r}: must be a samplers.base.Sampler")
        if self.pattern is not None and (not isinstance(self.pattern, str) or not self.pattern):
            raise ValueError(f"Dingo.pattern={self.pattern!r}: must be a non-empty regular expression")

    def bind(self, tokenizer) -> Dingo:
        if self.pattern is None:
            raise ValueError("Dingo.pattern is not set: give the regular expression answers must match "
                             "(Hydra: sampler.pattern='...')")
        return dataclasses.replace(self, inner=base.bind_inner(self.inner, tokenizer),
                                   automaton=compile_pattern(self.pattern, tokenizer))

    def validate(self, config: DecodeConfig) -> None:
        self.inner.validate(config)
        rule = self.inner
        while isinstance(rule, base.Sampler):
            if rule.writes_end_of_text:
                raise ValueError(f"Dingo with {type(rule).__name__} inside: its end-of-text truncation writes EOS the "
                                 "constraint did not choose; allowed: an inner rule without truncation")
            rule = getattr(rule, "inner", None)
        if self.automaton is None:
            raise ValueError("Dingo needs the tokenizer to compile its pattern: pass tokenizer= to generate "
                             "(or bind it: Dingo(...).bind(tokenizer))")
        shortest = self.automaton.shortest_match()
        if shortest is None:
            raise ValueError(f"Dingo.pattern={self.pattern!r} accepts no string of this tokenizer's tokens")
        if shortest > config.gen_length:
            raise ValueError(f"Dingo.pattern={self.pattern!r}: its shortest match takes {shortest} tokens, "
                             f"gen_length={config.gen_length}; allowed: gen_length >= {shortest}")

    def check_template(self, template, special) -> None:
        """An infilling template's fixed tokens must leave some accepted answer (engine `prepare`)."""
        template = jnp.asarray(template, jnp.int32)
        masked = template == special.mask
        zeros = jnp.zeros((*template.shape, self.automaton.first.shape[1]), jnp.float32)
        _, feasible = jax.vmap(lambda *row: best_accepted(*row, self.automaton, special.mask))(
            zeros, jnp.zeros_like(masked), masked, template)
        rows = np.flatnonzero(~np.asarray(feasible)).tolist()
        if rows:
            raise ValueError(f"Dingo.pattern={self.pattern!r}: no answer matches it with the fixed tokens of "
                             f"template row(s) {rows}")

    def settings(self) -> dict:
        return {"name": self.name, "pattern": self.pattern, "inner": self.inner.settings()}

    def init(self, state: DecodeState):
        return self.inner.init(state)

    def step(self, logits, state: DecodeState, carry):
        commit, carry = self.inner.step(logits, state, carry)
        if commit.truncate_at is not None:  # refused by `validate`; a rule that truncates without saying so
            raise ValueError(f"Dingo with inner={type(self.inner).__name__}: its end-of-text truncation writes "
                             "EOS the constraint did not choose; allowed: an inner rule without truncation")
        scores = base.apply_eos_policy(logits, state).astype(base.noise_dtype(state))
        if state.config.temperature > 0:  # perturb-and-MAP: the Gumbel noise the inner draws from
            scores = base.perturbed_logits(scores, state)
        scores = jax.nn.log_softmax(scores, axis=-1)
        masked = state.is_masked
        choose, wildcard = commit.commit & masked, masked & ~commit.commit
        tokens, feasible = jax.vmap(lambda *row: best_accepted(*row, self.automaton, state.special.mask))(
            scores, choose, wildcard, state.gen_tokens)
        # no accepted string: cannot happen from a canvas the constraint wrote (and a template's fixed
        # tokens are checked before decoding); were it to, the row stops unfinished, flagged in the results
        stop = ~feasible if commit.stop is None else commit.stop | ~feasible
        commit = commit.replace(tokens=jnp.where(choose, tokens, commit.tokens), commit=choose & feasible[:, None],
                                stop=stop)
        return commit, carry
