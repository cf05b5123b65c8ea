"""Masked-diffusion losses, training data, the train loop, checkpoints and resume.

Golden loss values are worked out by hand below (logits whose softmax is
known: [log 3, 0] gives p = [3/4, 1/4]), never by the code under test.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dllm import diffusion
from dllm.data import CorpusWindows, DataConfig, TaskBatches, check_batch_divides, make_data, task_tokenizer
from dllm.models.config import ModelConfig
from dllm.tasks import suite_examples
from dllm.training import TrainConfig, params_of, train

REPO = Path(__file__).resolve().parents[1]
TINY = ModelConfig(vocab_size=57, d_model=32, n_layers=2, n_heads=2, mlp_hidden=64, max_seq_len=48)
TASKS = ("copy", "reverse", "addition")


def tiny_train_config(workdir, **changes) -> TrainConfig:
    fields = dict(steps=24, batch_size=8, lr=1e-2, warmup_steps=2, log_every=4, eval_every=0, checkpoint_every=9,
                  keep_checkpoints=2, workdir=str(workdir), progress=False, tensorboard=False)
    return TrainConfig(**{**fields, **changes})


def tiny_data(config: TrainConfig, **changes):
    fields = dict(tasks=TASKS, n_per_task=16, eval_n_per_task=4)
    return make_data(DataConfig(**{**fields, **changes}), config.batch_size, config.seed)


def leftover_temporaries(folder: Path) -> list[str]:
    return [str(p) for p in folder.rglob("*") if "tmp" in p.name]


# --------------------------------------------------------------------------- #
# The forward process and the losses
# --------------------------------------------------------------------------- #

L3 = math.log(3.0)
# Row 0 and row 1, three positions, vocabulary {0, 1}. softmax([log 3, 0]) = [3/4, 1/4]; softmax([0, 0]) = [1/2, 1/2].
LOGITS = jnp.array([[[L3, 0.0], [L3, 0.0], [0.0, 0.0]],
                    [[0.0, 0.0], [L3, 0.0], [L3, 0.0]]])
TARGETS = jnp.array([[0, 0, 1], [1, 1, 0]])
MASKED = jnp.array([[False, True, True], [False, True, True]])
T = jnp.array([0.5, 0.25])


def test_pretrain_loss_by_hand():
    loss, metrics = diffusion.pretrain_loss(LOGITS, TARGETS, MASKED, T)
    # row 0: pos 1 target 0 under [3/4, 1/4] -> log(4/3); pos 2 target 1 under [1/2, 1/2] -> log 2; weight 1/0.5
    # row 1: pos 1 target 1 under [3/4, 1/4] -> log 4;   pos 2 target 0 under [3/4, 1/4] -> log(4/3); weight 1/0.25
    expected = (2 * (math.log(4 / 3) + math.log(2)) + 4 * (math.log(4) + math.log(4 / 3))) / 6  # B * L = 6
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    # argmax: row 0 -> [0, 0, 0] (ties go to 0), row 1 -> [0, 0, 0]; masked targets 0, 1 | 1, 0 -> 2 of 4 right
    assert float(metrics["masked_accuracy"]) == pytest.approx(0.5)
    assert int(metrics["masked_tokens"]) == 4
    # `valid` changes only the normalizer: 5 real tokens instead of 6.
    valid = jnp.array([[True, True, True], [False, True, True]])
    loss, _ = diffusion.pretrain_loss(LOGITS, TARGETS, MASKED, T, valid)
    assert float(loss) == pytest.approx(expected * 6 / 5, rel=1e-6)


def test_sft_loss_by_hand():
    # Position 0 is the prompt; positions 1-2 the answer (length 2 for both rows).
    answer = jnp.array([[False, True, True], [False, True, True]])
    masked = jnp.array([[False, True, False], [False, True, True]])
    loss, metrics = diffusion.sft_loss(LOGITS, TARGETS, masked, T, answer)
    row0 = math.log(4 / 3) / 0.5 / 2
    row1 = (math.log(4) + math.log(4 / 3)) / 0.25 / 2
    assert float(loss) == pytest.approx((row0 + row1) / 2, rel=1e-6)
    assert int(metrics["masked_tokens"]) == 3
    # A mask on a prompt position is ignored: the prompt never enters the SFT loss.
    with_prompt = masked.at[:, 0].set(True)
    assert float(diffusion.sft_loss(LOGITS, TARGETS, with_prompt, T, answer)[0]) == pytest.approx(float(loss))
    # Answer length normalizes per row: a 3-token answer region divides row sums by 3.
    loss3, _ = diffusion.sft_loss(LOGITS, TARGETS, masked, T, jnp.ones_like(answer))
    assert float(loss3) == pytest.approx((row0 * 2 / 3 + row1 * 2 / 3) / 2, rel=1e-6)


def test_sample_times_and_masking():
    t = diffusion.sample_times(jax.random.PRNGKey(0), 1000, eps=0.1)
    assert float(t.min()) >= 0.1 and float(t.max()) <= 1.0
    stratified = diffusion.sample_times(jax.random.PRNGKey(1), 8, eps=0.0, low_discrepancy=True)
    # (u + i / 8) mod 1: one sample in each eighth of [0, 1).
    assert sorted(np.floor(np.asarray(stratified) * 8).astype(int).tolist()) == list(range(8))

    tokens = jnp.arange(4 * 2000).reshape(4, 2000) % 50 + 3
    maskable = jnp.zeros_like(tokens, bool).at[:, 1000:].set(True)
    noisy, masked = diffusion.mask_tokens(jax.random.PRNGKey(2), tokens, jnp.array([0.0, 0.3, 0.7, 1.0]), 2,
                                          maskable)
    assert not bool(masked[:, :1000].any()) and bool((noisy[:, :1000] == tokens[:, :1000]).all())
    assert bool((noisy == 2).sum() == masked.sum())
    rate = np.asarray(masked[:, 1000:].mean(axis=1))
    np.testing.assert_allclose(rate, [0.0, 0.3, 0.7, 1.0], atol=0.05)


def test_elbo_of_uniform_and_perfect_predictions():
    vocab, tokens = 16, jax.random.randint(jax.random.PRNGKey(0), (16, 1024), 3, 16)
    uniform = lambda x: jnp.zeros((*x.shape, vocab))
    bits = diffusion.elbo_bits_per_token(uniform, tokens, jax.random.PRNGKey(1), mask_id=2, n_samples=16)
    # Each masked token costs log2(16) = 4 bits, weighted 1/t, and a fraction t is masked: 4 bits per token.
    assert float(bits) == pytest.approx(4.0, rel=0.05)
    perfect = lambda x: 30.0 * jax.nn.one_hot(tokens, vocab)
    assert float(diffusion.elbo_bits_per_token(perfect, tokens, jax.random.PRNGKey(1), mask_id=2)) < 1e-6


# --------------------------------------------------------------------------- #
# Data
# --------------------------------------------------------------------------- #


def test_task_batches_use_the_decoding_geometry():
    tokenizer = task_tokenizer()
    examples = suite_examples("train", 8, TASKS)
    batches = TaskBatches(examples, tokenizer, batch_size=4, seed=3, prompt_width=24, gen_length=24)
    batch = batches.batch(0)
    assert batch["tokens"].shape == (4, 48)
    for row, mask, index in zip(batch["tokens"], batch["attention_mask"], batches.indices(0)):
        example = examples[index]
        prompt, answer = row[:24], row[24:]
        n_pad = 24 - int(mask[:24].sum())
        assert (prompt[:n_pad] == tokenizer.pad_id).all() and (mask[24:] == 1).all()
        assert tokenizer.decode(prompt[n_pad:]) == example.prompt
        n_answer = len(example.answer.split())
        assert tokenizer.decode(answer[:n_answer]) == example.answer
        assert (answer[n_answer:] == tokenizer.eos_id).all()
    assert (batch["answer_mask"][:, 24:]).all() and not batch["answer_mask"][:, :24].any()
    # The prompt is never masked by the SFT forward process, even at t = 1.
    noisy, masked = diffusion.mask_tokens(jax.random.PRNGKey(0), batch["tokens"], jnp.ones(4), tokenizer.mask_id,
                                          batch["answer_mask"])
    assert (np.asarray(noisy[:, :24]) == batch["tokens"][:, :24]).all()
    assert (np.asarray(noisy[:, 24:]) == tokenizer.mask_id).all()


def test_task_batches_are_a_pure_function_of_seed_and_step():
    examples = suite_examples("train", 10, TASKS)
    a = TaskBatches(examples, task_tokenizer(), batch_size=6, seed=1)
    b = TaskBatches(examples, task_tokenizer(), batch_size=6, seed=1)
    assert all((a.batch(s)["tokens"] == b.batch(s)["tokens"]).all() for s in (7, 0, 3))
    # Five batches of 6 cover the 30 examples exactly once per epoch.
    assert sorted(np.concatenate([a.indices(s) for s in range(5)]).tolist()) == list(range(30))
    assert not (a.indices(5) == a.indices(0)).all()  # the next epoch is reshuffled


def test_corpus_windows(tmp_path):
    ids = np.arange(1000, dtype=np.uint16) % 50 + 3
    np.save(tmp_path / "train.npy", ids)
    windows = CorpusWindows(tmp_path / "train.npy", seq_len=16, batch_size=4, seed=0)
    batch = windows.batch(5)
    assert batch["tokens"].shape == (4, 16) and batch["tokens"].dtype == np.int32
    for row in batch["tokens"]:  # each row is a contiguous slice of the file
        start = int(np.flatnonzero(ids == row[0])[0])
        assert (row == (np.arange(start, start + 16) % 50 + 3)).all()
    assert (CorpusWindows(tmp_path / "train.npy", 16, 4, seed=0).batch(5)["tokens"] == batch["tokens"]).all()
    np.save(tmp_path / "empty.npy", np.zeros(0, np.uint16))
    with pytest.raises(ValueError, match="empty.npy: corpus file has no tokens"):
        CorpusWindows(tmp_path / "empty.npy", 16, 4)


def test_bad_data_inputs():
    with pytest.raises(ValueError, match="unknown task 'no_such_task'"):
        make_data(DataConfig(tasks=("no_such_task",), n_per_task=2), 4)
    with pytest.raises(ValueError, match="batch_size=10 does not divide over the 4 devices"):
        check_batch_divides(10, 4)
    with pytest.raises(ValueError, match="prompt has .* tokens; allowed 1..prompt_width=4"):
        make_data(DataConfig(tasks=("copy",), n_per_task=2, prompt_width=4), 4)
    with pytest.raises(ValueError, match="DataConfig.source='web'"):
        DataConfig(source="web")


def test_train_config_validation():
    with pytest.raises(ValueError, match=r"TrainConfig.warmup_steps=10: allowed an int in \[0, steps=10\)"):
        TrainConfig(steps=10, warmup_steps=10)
    with pytest.raises(ValueError, match="TrainConfig.objective='ar'"):
        TrainConfig(objective="ar")
    with pytest.raises(ValueError, match="TrainConfig.b2=1.0"):
        TrainConfig(b2=1.0)


# --------------------------------------------------------------------------- #
# The train loop
# --------------------------------------------------------------------------- #


def test_training_lowers_the_loss(tmp_path):
    config = tiny_train_config(tmp_path, checkpoint_every=0)
    losses = []
    result = train(TINY, config, tiny_data(config), callback=lambda step, m: losses.append(float(m["loss"])))
    assert len(losses) == 24
    assert np.mean(losses[-6:]) < 0.7 * np.mean(losses[:4]), losses
    # Metrics file, final model, no temporary folders, at most keep_checkpoints checkpoints.
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r.get("split") == "train"]
    assert [r["step"] for r in train_rows] == list(range(4, 25, 4))
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "masked_accuracy"} <= set(train_rows[0])
    assert (tmp_path / "model" / "config.json").is_file() and leftover_temporaries(tmp_path) == []
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["24"]
    import dllm

    model, tokenizer = dllm.from_pretrained(tmp_path / "model")
    assert model.config.mask_token_id == tokenizer.mask_id == task_tokenizer().mask_id
    for name, value in params_of(model).items():
        np.testing.assert_array_equal(np.asarray(value), np.asarray(params_of(result.model)[name]))


# Bitwise equality is checked on CPU, where XLA kernels are deterministic. (On GPU the scatter-add of
# the embedding gradient uses atomics; see the note in dllm/training.py.)
KILLED_RUN = textwrap.dedent("""
    import os, signal, sys
    os.environ["JAX_PLATFORMS"] = "cpu"
    sys.path.insert(0, {repo!r})
    from tests.test_training import TINY, tiny_data, tiny_train_config
    from dllm.training import train

    def kill(step, metrics):
        if step == 12:  # checkpoint 9 is on disk, steps 10-12 are not
            os.kill(os.getpid(), signal.SIGKILL)

    config = tiny_train_config({workdir!r})
    train(TINY, config, tiny_data(config), callback=kill)
""")
CPU = jax.devices("cpu")


def test_killed_run_resumes_bitwise(tmp_path):
    workdir = tmp_path / "killed"
    script = KILLED_RUN.format(repo=str(REPO), workdir=str(workdir))
    log = tmp_path / "killed.log"
    with open(log, "w") as f:
        killed = subprocess.Popen([sys.executable, "-c", script], stdout=f, stderr=subprocess.STDOUT)
        reference = tiny_train_config(tmp_path / "uninterrupted")  # meanwhile, the run that is not killed
        uninterrupted = train(TINY, reference, tiny_data(reference), devices=CPU)
        killed.wait(timeout=120)
    assert killed.returncode == -9, log.read_text()[-3000:]
    assert sorted(os.listdir(workdir / "checkpoints")) == ["9"]
    # A save interrupted by a kill leaves only a temporary folder; resume must ignore and delete it.
    partial = workdir / "checkpoints" / "12.orbax-checkpoint-tmp-1234"
    (partial / "state").mkdir(parents=True)

    config = tiny_train_config(workdir)  # everything rebuilt from the workdir
    resumed = train(TINY, config, tiny_data(config), devices=CPU)
    assert resumed.step == uninterrupted.step == 24
    expected, got = params_of(uninterrupted.model), params_of(resumed.model)
    assert sorted(expected) == sorted(got)
    for name in expected:
        np.testing.assert_array_equal(np.asarray(got[name]), np.asarray(expected[name]), err_msg=name)
    assert leftover_temporaries(workdir) == []
    assert sorted(os.listdir(workdir / "checkpoints")) == ["18", "24"]
    events = [json.loads(line).get("event") for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert events.count("start") == 1 and events.count("resume") == 1


class Stop(Exception):
    pass


def stop_at(step):
    def callback(current, metrics):
        if current == step:
            raise Stop

    return callback


def test_resume_from_another_model_shape_raises(tmp_path):
    config = tiny_train_config(tmp_path, checkpoint_every=1)
    data = tiny_data(config)
    with pytest.raises(Stop):
        train(TINY, config, data, callback=stop_at(2))
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1"]
    wider = TINY.replace(d_model=48)
    with pytest.raises(ValueError, match=r"parameter 'attn_norm' has shape \(2, 32\) in the checkpoint, "
                                         r"the model config expects \(2, 48\)"):
        train(wider, config, data)
    with pytest.raises(ValueError, match="TrainConfig.resume=False but .* holds checkpoints up to step 1"):
        train(TINY, tiny_train_config(tmp_path, resume=False), data)


def test_pretraining_on_a_corpus_reports_bits_per_token(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    task_tokenizer().save(corpus)
    rng = np.random.default_rng(0)
    np.save(corpus / "train.npy", rng.integers(4, 57, 5000).astype(np.uint16))
    np.save(corpus / "val.npy", rng.integers(4, 57, 500).astype(np.uint16))
    config = tiny_train_config(tmp_path / "run", steps=2, warmup_steps=1, objective="pretrain", eval_every=2,
                               eval_batches=1, elbo_samples=2)
    data = make_data(DataConfig(source="corpus", path=str(corpus / "train.npy"), val_path=str(corpus / "val.npy"),
                                seq_len=32), config.batch_size, config.seed)
    result = train(TINY, config, data)
    assert 4.0 < result.metrics["eval_bits_per_token"] < 8.0  # ~log2(53) for random tokens
    with pytest.raises(ValueError, match="objective='sft' needs prompt/answer data"):
        train(TINY, tiny_train_config(tmp_path / "sft"), data)


@pytest.mark.parametrize("objective", ["pretrain", "autoregressive", "block_causal"])
def test_batch_without_attention_mask_is_one_without_padding(objective):
    """A batch with no attention_mask (corpus windows) gives the loss, metrics and gradients, and the eval
    step's metrics, of the same batch with an all-ones mask: the bidirectional and causal models' attention
    then runs with no mask argument, and the block-causal 2L forward (with the complementary copy) builds
    its pair mask from all ones."""
    from flax import nnx

    from dllm.models.transformer import Transformer
    from dllm.training import make_eval_step, training_loss

    config = {"pretrain": TINY, "autoregressive": TINY.replace(attention="causal", token_shift=True),
              "block_causal": TINY.replace(attention="block_causal", block_size=4)}[objective]
    block = dict(block_noise="per_block", complementary_mask=True) if objective == "block_causal" else {}
    objective = "autoregressive" if objective == "autoregressive" else "pretrain"
    graphdef, params = nnx.split(Transformer(config, rngs=nnx.Rngs(0)), nnx.Param)
    tokens = jax.random.randint(jax.random.PRNGKey(1), (3, 16), 3, 57)
    masked, unmasked = {"tokens": tokens, "attention_mask": jnp.ones_like(tokens)}, {"tokens": tokens}
    loss = lambda p, batch: training_loss(graphdef, p, batch, jax.random.PRNGKey(2), objective=objective, mask_id=2,
                                          time_eps=1e-3, low_discrepancy=True, **block)
    (with_mask, metrics_a), grads_a = jax.value_and_grad(loss, has_aux=True)(params, masked)
    (without, metrics_b), grads_b = jax.value_and_grad(loss, has_aux=True)(params, unmasked)
    np.testing.assert_allclose(without, with_mask, rtol=1e-6)
    for name in metrics_a:
        np.testing.assert_allclose(metrics_b[name], metrics_a[name], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b)):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)
    eval_step = make_eval_step(graphdef, TrainConfig(objective=objective, elbo_samples=2,
                                                     block_noise=block.get("block_noise", "per_row")), mask_id=2)
    eval_a, eval_b = eval_step(params, masked, jax.random.PRNGKey(3)), eval_step(params, unmasked, jax.random.PRNGKey(3))
    assert "bits_per_token" in eval_a
    for name in eval_a:
        np.testing.assert_allclose(eval_b[name], eval_a[name], rtol=1e-6)


def test_training_layout_chooses_the_attention_kernel_only(tmp_path):
    from flax import nnx

    from dllm import sharding
    from dllm.models.layout import Layout
    from dllm.training import init_training

    config = tiny_train_config(tmp_path, steps=1, warmup_steps=0)
    for bad in (Layout(scan_layers=False), Layout(fused_projections=True)):
        with pytest.raises(ValueError, match="a training layout chooses the attention kernel .* and scan_unroll only"):
            train(TINY, config, tiny_data(config), model_layout=bad)
    assert not (tmp_path / "checkpoints").exists()  # refused before the run folder was touched
    placement = sharding.Placement.of(sharding.make_mesh(sharding.MeshConfig(num_devices=1)))
    graphdef, params, *_ = init_training(TINY.replace(mask_token_id=2), config, 2, placement,
                                         Layout(attention_impl="xla", scan_unroll=2))
    assert nnx.merge(graphdef, params).layout == Layout(attention_impl="xla", scan_unroll=2)
    default_graphdef, *_ = init_training(TINY.replace(mask_token_id=2), config, 2, placement)
    assert nnx.merge(default_graphdef, params).layout.attention_impl is None


MULTI_DEVICE = textwrap.dedent("""
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    os.environ["JAX_PLATFORMS"] = "cpu"  # two fake CPU devices, also on a GPU machine
    sys.path.insert(0, {repo!r})
    from tests.test_training import TINY, tiny_data, tiny_train_config
    from dllm.training import train
    config = tiny_train_config({workdir!r}, batch_size=3)
    train(TINY, config, tiny_data(config))
""")


def test_batch_that_does_not_divide_over_the_devices_raises(tmp_path):
    script = MULTI_DEVICE.format(repo=str(REPO), workdir=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert "ValueError: batch_size=3 does not divide over the 2 devices of mesh axis 'data'" in out.stderr, \
        out.stderr[-3000:]


# --------------------------------------------------------------------------- #
# The Hydra entry point
# --------------------------------------------------------------------------- #


def compose(overrides):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base=None):
        return hydra_compose(config_name="train", overrides=overrides)


@pytest.mark.parametrize("model", ["tiny_tasks", "small_text", "llada_8b", "dream_7b"])
@pytest.mark.parametrize("preset", ["tiny_tasks", "small_text", "smoke"])
def test_every_preset_builds_its_configs(model, preset):
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(compose([f"model={model}", f"train={preset}"]), resolve=True)
    ModelConfig(**cfg["model"])
    TrainConfig(**cfg["train"])
    DataConfig(**cfg["data"])


@pytest.mark.parametrize("preset", ["tasks_base", "text_base", "text_ar"])
def test_bundled_model_presets_build_their_configs(preset):
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(compose([f"model={preset}", f"train={preset}"]), resolve=True)
    model = ModelConfig(**cfg["model"])
    train = TrainConfig(**cfg["train"])
    data = DataConfig(**cfg["data"])
    if preset == "tasks_base":  # the model's vocabulary and canvas are the parallel suite's
        assert data.suite == "parallel" and model.vocab_size == task_tokenizer("parallel").vocab_size
        assert model.max_seq_len == data.prompt_width + data.gen_length
    if preset == "text_ar":
        assert train.objective == "autoregressive" and model.attention == "causal" and model.token_shift


def test_hydra_entry_point_trains_and_saves(tmp_path):
    from experiments.train import run

    # The smoke preset, with the update and model of the tests above (so the compiled step is reused).
    train_overrides = [f"train.{name}={'null' if value is None else value}"
                       for name, value in dataclasses.asdict(tiny_train_config(tmp_path)).items()]
    model_overrides = [f"model.{name}={getattr(TINY, name)}"
                       for name in ("d_model", "n_layers", "n_heads", "mlp_hidden")]
    cfg = compose(["train=smoke", "model=tiny_tasks", *model_overrides, *train_overrides,
                   f"data.tasks=[{','.join(TASKS)}]", "data.n_per_task=16"])
    result = run(cfg)
    assert result.step == 24
    metadata = json.loads((tmp_path / "model" / "metadata.json").read_text())
    assert metadata["step"] == 24 and metadata["hydra_config"]["train"]["steps"] == 24
    assert metadata["hydra_config"]["model"]["d_model"] == 32
