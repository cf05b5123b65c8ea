"""Training data: task-suite SFT batches and random windows of a token corpus.

Every batch is a pure function of (seed, step): `batches.batch(step)`. The
data position of a run is therefore its step, and a resumed run reads exactly
the batches the killed run would have read (md4 checkpoints its iterator
state for the same reason). `state()` names what a checkpoint must match.

Task batches use the decoding geometry of `dllm.generate`, so the model is
trained on the canvas it will decode:

    [pad ... pad | prompt tokens ] [ answer tokens | EOS ... EOS ]
     <------- prompt_width ------> <-------- gen_length -------->
    attention_mask: 0 on the left padding, 1 elsewhere
    answer_mask:    1 on the gen_length columns (answer + EOS padding)

The EOS padding is part of the answer, as in LLaDA's SFT (arXiv 2502.09992,
§2.3): the model learns to fill the tail of the generation with EOS.

Corpus batches are random windows of `seq_len` tokens from a flat .npy of
token ids (`dllm.corpus.encode_corpus`: documents separated by EOS), with no
padding, so they carry no attention_mask: a bidirectional or causal model's attention then runs
unmasked in the train step (the fused cuDNN kernel's fast path; `dllm.training.training_loss`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import numpy as np

from dllm.tokenizer import Tokenizer

SOURCES = ("tasks", "corpus")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """What to train on (Hydra fills it from `cfg.data`).

    Attributes:
      source: "tasks" (a synthetic suite, SFT pairs) or "corpus" (a token .npy).
      suite: source "tasks": the task suite, "tiny" or "parallel"
        (`dllm.tasks.SUITES`); its word-level tokenizer is the model's.
      tasks: task names of the suite for source "tasks"; None means every task.
      n_per_task: training examples per task; None means the task split's
        default size (`dllm.tasks.DEFAULT_SPLIT_SIZES`).
      eval_n_per_task: held-out (test split) examples per task for eval loss.
      prompt_width: columns of the left-padded prompt (>= longest prompt).
      gen_length: columns of the answer + EOS padding (>= longest answer).
      path: source "corpus": the training .npy of token ids.
      val_path: source "corpus": the validation .npy (None: no eval).
      tokenizer: folder holding tokenizer.json for source "corpus" (None: the
        folder of `path`).
      seq_len: source "corpus": tokens per training window.
    """

    source: str = "tasks"
    suite: str = "tiny"
    tasks: tuple[str, ...] | None = None
    n_per_task: int | None = None
    eval_n_per_task: int = 64
    prompt_width: int = 24
    gen_length: int = 24
    path: str | None = None
    val_path: str | None = None
    tokenizer: str | None = None
    seq_len: int = 256

    def __post_init__(self):
        if self.source not in SOURCES:
            raise ValueError(f"DataConfig.source={self.source!r}: allowed {SOURCES}")
        from dllm.tasks import SUITES

        if self.suite not in SUITES:
            raise ValueError(f"DataConfig.suite={self.suite!r}: allowed {tuple(SUITES)}")
        if self.tasks is not None:
            object.__setattr__(self, "tasks", tuple(self.tasks))
        for name in ("prompt_width", "gen_length", "seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"DataConfig.{name}={value!r}: must be a positive int")
        if self.n_per_task is not None and (not isinstance(self.n_per_task, int) or self.n_per_task <= 0):
            raise ValueError(f"DataConfig.n_per_task={self.n_per_task!r}: must be a positive int or None")
        if not isinstance(self.eval_n_per_task, int) or self.eval_n_per_task < 0:
            raise ValueError(f"DataConfig.eval_n_per_task={self.eval_n_per_task!r}: must be an int >= 0")
        if self.source == "corpus" and not self.path:
            raise ValueError("DataConfig.path is required for source='corpus' (a .npy of token ids)")


def check_batch_divides(batch_size: int, n_shards: int, axis: str = "data") -> None:
    """Raises ValueError unless `batch_size` splits evenly over the `n_shards` devices of mesh axis `axis`."""
    if batch_size % n_shards:
        raise ValueError(
            f"batch_size={batch_size} does not divide over the {n_shards} devices of mesh axis {axis!r}; "
            f"allowed: a multiple of {n_shards}"
        )


def task_tokenizer(suite: str = "tiny") -> Tokenizer:
    """The word-level tokenizer of task suite `suite` with its special ids resolved by name."""
    from dllm.tasks.synthetic import vocab

    backend = vocab.build_task_tokenizer(suite)
    ids = {token: backend.token_to_id(token) for token in (vocab.MASK, vocab.END_OF_TEXT, vocab.PAD)}
    return Tokenizer(backend, mask_id=ids[vocab.MASK], eos_id=ids[vocab.END_OF_TEXT], pad_id=ids[vocab.PAD],
                     source=f"dllm.tasks.synthetic.vocab ({suite} suite)")


def encode_examples(examples: Sequence, tokenizer: Tokenizer, prompt_width: int,
                    gen_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Examples -> (tokens int32 [N, prompt_width + gen_length], attention_mask int32 [N, same]).

    Prompts are left-padded with the pad id; answers are followed by EOS up
    to `gen_length`. Raises ValueError naming the example that does not fit.
    """
    n, width = len(examples), prompt_width + gen_length
    tokens = np.full((n, width), tokenizer.pad_id, np.int32)
    tokens[:, prompt_width:] = tokenizer.eos_id
    attention_mask = np.ones((n, width), np.int32)
    prompts = tokenizer.backend.encode_batch([e.prompt for e in examples], add_special_tokens=False)
    answers = tokenizer.backend.encode_batch([e.answer for e in examples], add_special_tokens=False)
    for i, (example, prompt, answer) in enumerate(zip(examples, prompts, answers)):
        p, a = prompt.ids, answer.ids
        if not 0 < len(p) <= prompt_width:
            raise ValueError(f"example {i} ({example.task}): prompt has {len(p)} tokens; "
                             f"allowed 1..prompt_width={prompt_width}: {example.prompt!r}")
        if len(a) > gen_length:
            raise ValueError(f"example {i} ({example.task}): answer has {len(a)} tokens; "
                             f"allowed at most gen_length={gen_length}: {example.answer!r}")
        tokens[i, prompt_width - len(p):prompt_width] = p
        attention_mask[i, :prompt_width - len(p)] = 0
        tokens[i, prompt_width:prompt_width + len(a)] = a
    return tokens, attention_mask


class TaskBatches:
    """SFT batches of prompt/answer pairs; `batch(step)` is a pure function of (seed, step).

    Training order: the examples are visited epoch after epoch, each epoch in
    the permutation `default_rng([seed, epoch])` (no shuffle: in order).
    Batch `step` holds the examples at global positions
    step * batch_size ... (step + 1) * batch_size - 1 of that endless stream.
    """

    def __init__(self, examples: Sequence, tokenizer: Tokenizer, batch_size: int, *, seed: int = 0,
                 prompt_width: int = 24, gen_length: int = 24, shuffle: bool = True):
        if not examples:
            raise ValueError("TaskBatches: no examples (check data.tasks and data.n_per_task)")
        self.tokens, self.attention_mask = encode_examples(examples, tokenizer, prompt_width, gen_length)
        self.answer_mask = np.zeros(self.tokens.shape[1], bool)
        self.answer_mask[prompt_width:] = True
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        self.prompt_width, self.gen_length = prompt_width, gen_length
        self._orders: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def seq_len(self) -> int:
        return self.tokens.shape[1]

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            if len(self._orders) > 4:
                self._orders.clear()
            n = len(self.tokens)
            self._orders[epoch] = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle \
                else np.arange(n)
        return self._orders[epoch]

    def indices(self, step: int) -> np.ndarray:
        positions = step * self.batch_size + np.arange(self.batch_size)
        epochs, offsets = np.divmod(positions, len(self.tokens))
        idx = np.empty(self.batch_size, np.int64)
        for epoch in np.unique(epochs):
            rows = epochs == epoch
            idx[rows] = self._order(int(epoch))[offsets[rows]]
        return idx

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """tokens, attention_mask (int32 [B, L]) and answer_mask (bool [B, L]) of batch `step`."""
        idx = self.indices(step)
        return {
            "tokens": self.tokens[idx],
            "attention_mask": self.attention_mask[idx],
            "answer_mask": np.broadcast_to(self.answer_mask, (len(idx), self.seq_len)).copy(),
        }

    def state(self) -> dict:
        """What a resumed run must match to read the same stream."""
        return {"kind": "tasks", "seed": self.seed, "batch_size": self.batch_size, "num_examples": len(self),
                "seq_len": self.seq_len}


class CorpusWindows:
    """Windows of `seq_len` tokens from a flat token .npy; `batch(step)` is a pure function of (seed, step).

    `sequential=False`: B random start offsets from `default_rng([seed, step])`
    (training). `sequential=True`: consecutive non-overlapping windows from the
    start of the file, wrapping around (validation).
    """

    def __init__(self, path: str | Path, seq_len: int, batch_size: int, *, seed: int = 0, sequential: bool = False):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: corpus token file does not exist")
        tokens = np.load(path, mmap_mode="r")
        if tokens.size == 0:
            raise ValueError(f"{path}: corpus file has no tokens")
        if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(f"{path}: expected a 1-D array of integer token ids, got {tokens.dtype} {tokens.shape}")
        if tokens.size < seq_len:
            raise ValueError(f"{path}: corpus has {tokens.size} tokens, fewer than seq_len={seq_len}")
        self.path, self.tokens = path, tokens
        self.seq_len, self.batch_size, self.seed, self.sequential = seq_len, batch_size, seed, sequential

    def __len__(self) -> int:
        return self.tokens.size

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """tokens, int32 [B, seq_len] (no padding, hence no attention_mask)."""
        n_starts = self.tokens.size - self.seq_len + 1
        if self.sequential:
            starts = ((step * self.batch_size + np.arange(self.batch_size)) * self.seq_len) % n_starts
        else:
            starts = np.random.default_rng([self.seed, step]).integers(0, n_starts, self.batch_size)
        tokens = np.stack([np.asarray(self.tokens[s:s + self.seq_len], np.int32) for s in starts])
        return {"tokens": tokens}

    def state(self) -> dict:
        return {"kind": "corpus", "seed": self.seed, "batch_size": self.batch_size, "num_tokens": int(len(self)),
                "seq_len": self.seq_len}


@dataclasses.dataclass
class Data:
    """The training stream, an optional fixed evaluation stream, and the tokenizer."""

    train: TaskBatches | CorpusWindows
    eval: TaskBatches | CorpusWindows | None
    tokenizer: Tokenizer
    config: DataConfig

    @property
    def has_answers(self) -> bool:
        return isinstance(self.train, TaskBatches)


def make_data(config: DataConfig, batch_size: int, seed: int = 0) -> Data:
    """Builds the training and evaluation streams of `config`.

    Raises ValueError for an unknown task (from `dllm.tasks.get_task`), an
    example that does not fit the geometry, or a corpus file with no tokens.
    """
    if config.source == "tasks":
        from dllm.tasks import suite_examples

        tokenizer = task_tokenizer(config.suite)
        geometry = dict(prompt_width=config.prompt_width, gen_length=config.gen_length)
        train = TaskBatches(suite_examples("train", config.n_per_task, config.tasks, config.suite), tokenizer,
                            batch_size, seed=seed, **geometry)
        evaluation = None
        if config.eval_n_per_task:
            evaluation = TaskBatches(suite_examples("test", config.eval_n_per_task, config.tasks, config.suite),
                                     tokenizer, batch_size, seed=seed, shuffle=False, **geometry)
        return Data(train, evaluation, tokenizer, config)
    path = Path(config.path)
    tokenizer = Tokenizer.from_folder(Path(config.tokenizer) if config.tokenizer else path.parent)
    train = CorpusWindows(path, config.seq_len, batch_size, seed=seed)
    evaluation = None
    if config.val_path:
        evaluation = CorpusWindows(config.val_path, config.seq_len, batch_size, seed=seed, sequential=True)
    return Data(train, evaluation, tokenizer, config)
