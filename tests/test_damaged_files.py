"""Damaged files give one clear line naming the file and what is wrong; training resume falls back to the
newest checkpoint that restores (issue: reliability)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

import dllm
from dllm.training import train
from tests.hf_fixtures import make_llada
from tests.test_training import TINY, tiny_data, tiny_train_config


@pytest.fixture(scope="module")
def llada_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llada")
    make_llada(folder, n_shards=2)
    return folder


def damaged_copy(llada_folder, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(llada_folder, folder)
    return folder


def test_a_truncated_shard_names_the_file_and_the_bytes(llada_folder, tmp_path):
    folder = damaged_copy(llada_folder, tmp_path)
    shard = sorted(folder.glob("*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(ValueError, match=rf"{shard.name}: truncated safetensors shard: tensor '.*' needs bytes up to"):
        dllm.from_pretrained(folder)


def test_a_garbage_shard_is_a_bad_header(llada_folder, tmp_path):
    folder = damaged_copy(llada_folder, tmp_path)
    shard = sorted(folder.glob("*.safetensors"))[0]
    shard.write_bytes(os.urandom(4096))
    with pytest.raises(ValueError, match=rf"{shard.name}: bad safetensors header"):
        dllm.from_pretrained(folder)
    shard.write_bytes(b"\x01\x02")
    with pytest.raises(ValueError, match=rf"{shard.name}: truncated safetensors shard \(2 bytes"):
        dllm.from_pretrained(folder)


def test_bad_json_names_the_file_line_and_column(llada_folder, tmp_path):
    folder = damaged_copy(llada_folder, tmp_path)
    (folder / "config.json").write_text('{"model_type": "llada",\n "d_model": }')
    with pytest.raises(ValueError, match=r"config.json: not valid JSON \(Expecting value at line 2, column 13\)"):
        dllm.from_pretrained(folder)
    (folder / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"config.json: expected a JSON object, got a list"):
        dllm.from_pretrained(folder)


def test_our_config_without_arch_names_the_field(tmp_path):
    source = Path(__file__).resolve().parents[1] / "checkpoints/tiny-tasks"
    folder = tmp_path / "tiny"
    shutil.copytree(source, folder)
    config = json.loads((folder / "config.json").read_text())
    del config["arch"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config.json: missing config field 'arch'"):
        dllm.from_pretrained(folder)


def test_a_missing_rope_theta_says_which_default_applies(llada_folder, tmp_path):
    folder = damaged_copy(llada_folder, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    del config["rope_theta"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.warns(UserWarning, match=r"no 'rope_theta'; using 10000.0, LLaDAConfig's default"):
        model, _ = dllm.from_pretrained(folder)
    assert model.config.rope_theta == 10000.0


def test_resume_skips_a_damaged_latest_checkpoint_and_says_so(tmp_path, capsys):
    config = tiny_train_config(tmp_path, steps=12, checkpoint_every=4, keep_checkpoints=3)
    train(TINY, config, tiny_data(config))
    assert sorted(os.listdir(tmp_path / "checkpoints"), key=int) == ["4", "8", "12"]
    for path in (tmp_path / "checkpoints" / "12").rglob("*"):  # every file of the latest one damaged
        if path.is_file():
            path.write_bytes(b"garbage")
    longer = tiny_train_config(tmp_path, steps=16, checkpoint_every=4, keep_checkpoints=3)
    resumed = train(TINY, longer, tiny_data(longer))
    assert resumed.step == 16
    out = capsys.readouterr().out
    assert f"resume: skipping damaged checkpoint {tmp_path / 'checkpoints' / '12'}" in out
    assert f"moved {tmp_path / 'checkpoints' / '12'} to {tmp_path / 'checkpoints' / '12.unrestorable'}" in out
    events = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e.get("event") == "resume"] == [8]
    # the steps after the restored one are saved again (orbax would refuse them with the damaged 12 in place)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["12", "12.unrestorable", "16", "8"]
    again = train(TINY, longer, tiny_data(longer))  # and the next resume starts from the new, intact 16
    assert again.step == 16 and "skipping" not in capsys.readouterr().out
