"""No silent failure: bad paths, ignored overrides, unfinished decodes and bad inputs give messages
that name the bad value and what is allowed (issue: reliability)."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
from omegaconf import OmegaConf

import dllm
import samplers
from dllm import evaluation
from dllm.decoding import DecodeConfig
from experiments import common
from experiments.common import REPO_ROOT


@pytest.fixture(scope="module")
def tiny():
    return dllm.from_pretrained(REPO_ROOT / "checkpoints/tiny-tasks")


def config(**fields):
    base = {"checkpoint": "checkpoints/tiny-tasks", "dtype": "float32", "layout": {}, "seed": 0,
            "model": OmegaConf.to_container(OmegaConf.load(REPO_ROOT / "configs/model/tiny_tasks.yaml"))}
    return OmegaConf.create({**base, **fields})


def test_a_mistyped_checkpoint_is_an_error_naming_it_and_its_neighbours():
    with pytest.raises(FileNotFoundError) as error:
        common.load_model(config(checkpoint="checkpoints/tiny-task"))
    message = str(error.value)
    assert "checkpoint='checkpoints/tiny-task'" in message and "tiny-tasks" in message and "tasks-base" in message
    assert "checkpoint=null" in message


def test_only_checkpoint_null_builds_a_random_model(capsys):
    model, tokenizer, source = common.load_model(config(checkpoint=None))
    assert source == "random-init" and "RANDOMLY INITIALISED" in capsys.readouterr().out
    assert model.config.vocab_size == tokenizer.vocab_size


def test_model_overrides_with_a_checkpoint_are_refused(monkeypatch):
    monkeypatch.setattr(common, "cli_overrides", lambda: ["sampler=threshold", "model.d_model=512"])
    with pytest.raises(ValueError, match=r"model.d_model=512: model.\* settings do not apply .*layout.\*"):
        common.load_model(config())


def test_an_unfinished_decode_is_flagged_and_printed_as_mask(tiny):
    model, tokenizer = tiny
    prompts = ["reverse : Ann Bob Cid Dan Eve Fay Gus Hal =>", "copy : Ann Bob Cid Dan Eve Fay Gus Hal =>"]
    rows, _ = evaluation.decode_texts(model, tokenizer, samplers.LowConfidence(), prompts,
                                      DecodeConfig(gen_length=24, block_length=8, max_steps=2), batch_size=2)
    for row in rows:
        assert not row["finished"] and row["left_masked"] == 22
        assert row["output"].count(evaluation.MASK_TEXT) == 22
    done, _ = evaluation.decode_texts(model, tokenizer, samplers.LowConfidence(), prompts[:1],
                                      DecodeConfig(gen_length=24, block_length=8), batch_size=1)
    assert done[0]["finished"] and evaluation.MASK_TEXT not in done[0]["output"]


def test_prompt_inputs_say_what_is_allowed(tiny):
    model, tokenizer = tiny
    decode = DecodeConfig(gen_length=8, block_length=8)
    sampler = samplers.LowConfidence()
    with pytest.raises(TypeError, match="prompts must be a list of strings, got 'sort'.*wrap it in a list"):
        evaluation.decode_texts(model, tokenizer, sampler, "sort", decode)
    with pytest.raises(ValueError, match="batch_size=0: must be a positive int"):
        evaluation.decode_texts(model, tokenizer, sampler, ["copy : Ann =>"], decode, batch_size=0)
    ids = tokenizer.encode("copy : Ann Bob =>")
    with pytest.raises(TypeError, match=r"one flat list of 5 token ids.*\[tokens\]"):
        dllm.generate(model, ids, sampler, gen_length=8, block_length=8, key=jax.random.key(0), tokenizer=tokenizer)
    with pytest.raises(TypeError, match="got text; encode it first"):
        dllm.generate(model, ["copy : Ann =>"], sampler, gen_length=8, block_length=8, key=jax.random.key(0),
                      tokenizer=tokenizer)
    result = dllm.generate(model, [ids], sampler, gen_length=8, block_length=8, key=jax.random.key(0),
                           tokenizer=tokenizer)
    assert np.asarray(result.tokens).shape == (1, 8)


def test_report_skips_a_non_numeric_accuracy_by_name(tmp_path, capsys):
    from experiments.report import read_results

    good = {"accuracy": 0.5, "mean_nfe": 3.0, "sampler": {"name": "threshold", "tau": 0.9}}
    bad = {**good, "accuracy": "high"}
    path = tmp_path / "results.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    records, problems = read_results(path)
    assert len(records) == 1
    assert problems == [f"{path}:2: accuracy='high' must be numbers; line skipped"]


def test_atomic_files_keep_the_old_file_on_failure_and_take_the_umask(tmp_path):
    path = tmp_path / "report.md"
    path.write_text("old")
    with pytest.raises(RuntimeError):
        with evaluation.atomic_file(path) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["report.md"]
    umask = os.umask(0o022)
    try:
        evaluation.write_json_atomic(tmp_path / "new.json", {"a": 1})
    finally:
        os.umask(umask)
    assert (tmp_path / "new.json").stat().st_mode & 0o777 == 0o644


# ------------------------------------------------------------------ batch invariance

INVARIANCE_PROMPTS = [f"{op} : {' '.join(names)} =>" for op, names in [
    ("reverse", "Ann Bob Cid Dan Eve Fay Gus Hal".split()), ("sort", "Hal Eve Ann Gus Bob Fay Dan Cid".split()),
    ("shuffle", "Ann Bob Cid Dan Eve Fay Gus Hal Ivy".split()), ("copy", "Kim Lou Max Ned Oli Pam Quin Ray".split()),
    ("reverse", "Sam Tom Uma Val Wes Zoe Ann Bob Cid Dan".split()), ("sort", "Zoe Wes Val Uma Tom Sam Ray Quin".split()),
]]


def decode_rows(model, tokenizer, sampler, prompts, decode, batch_size, key):
    rows, _ = evaluation.decode_texts(model, tokenizer, sampler, prompts, decode, batch_size=batch_size, key=key)
    return [row["tokens"] for row in rows]


@pytest.mark.parametrize("cache, temperature", [("dual", 0.0), ("prefix", 0.0), ("none", 1.0), ("dual", 1.0)])
def test_a_row_decodes_the_same_alone_and_in_any_batch(tiny, cache, temperature):
    """Batch-size invariance (Fast-dLLM issue #39): under threshold decoding rows finish their blocks at
    different steps, so a batch-wide cache refresh or a noise draw shaped by the batch would move a row's
    tokens. Each row, decoded alone, in a batch of all six and in batches of four (two filler rows in the
    last), gives the same tokens."""
    model, tokenizer = tiny
    sampler = samplers.Threshold(tau=0.9)
    decode = DecodeConfig(gen_length=24, block_length=8, cache=cache, temperature=temperature)
    key = jax.random.key(7)
    together = decode_rows(model, tokenizer, sampler, INVARIANCE_PROMPTS, decode, 6, key)
    in_fours = decode_rows(model, tokenizer, sampler, INVARIANCE_PROMPTS, decode, 4, key)
    alone = decode_rows(model, tokenizer, sampler, INVARIANCE_PROMPTS, decode, 1, key)
    assert together == alone and in_fours == alone
