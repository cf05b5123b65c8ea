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


def test_unknown_words_are_an_error_unless_allowed(tiny):
    _, tokenizer = tiny
    with pytest.raises(ValueError, match=r"\['Foo', 'Bar'\] not in the tokenizer's vocabulary .*allow_unk=true"):
        tokenizer.encode("copy : Ann Foo Bob Bar =>")
    tokenizer.allow_unk = True
    try:
        assert tokenizer.encode("copy : Ann Foo =>").count(tokenizer.unk_id) == 1
    finally:
        tokenizer.allow_unk = False
    assert tokenizer.unk_id not in tokenizer.encode("copy : Ann Bob =>")


@pytest.mark.parametrize("sampler, cache", [(samplers.Threshold(tau=0.9), "dual"), (samplers.LowConfidence(), "none")])
def test_stepping_through_a_decode_gives_the_tokens_of_generate(tiny, sampler, cache):
    model, tokenizer = tiny
    prompts = [tokenizer.encode("reverse : Ann Bob Cid Dan Eve Fay Gus Hal =>"),
               tokenizer.encode("shuffle : Ann Bob Cid Dan Eve Fay Gus Hal Ivy Jon =>")]
    settings = dict(gen_length=24, block_length=8, tokenizer=tokenizer, key=jax.random.key(3), temperature=1.0,
                    cache=cache)
    result = dllm.generate(model, prompts, sampler, **settings)
    steps = list(dllm.decoding.steps(model, prompts, sampler, **settings))
    np.testing.assert_array_equal(steps[-1].tokens, np.asarray(result.tokens))
    assert len(steps) == int(np.asarray(result.nfe).max())
    written = np.stack([s.committed for s in steps])  # [steps, B, G]: every position written exactly once
    assert (written.sum(0) == 1).all() and steps[-1].done.all()
    first = np.asarray(result.trace.commit_step)
    np.testing.assert_array_equal(written.argmax(0), first)  # the step each position was written at
    assert steps[0].logits.shape[0] == 2 and steps[0].logits.shape[-1] == model.config.vocab_size


def test_dllm_never_imports_samplers():
    """The layers run one way: `samplers` builds on `dllm` (the contract is `dllm.decoding.sampler`)."""
    import ast

    offenders = []
    for path in sorted((REPO_ROOT / "dllm").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            offenders += [f"{path.relative_to(REPO_ROOT)}:{node.lineno}" for n in names
                          if n == "samplers" or n.startswith("samplers.")]
    assert offenders == []
