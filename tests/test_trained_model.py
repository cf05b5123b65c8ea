"""Every sampler decodes the bundled, trained `tiny-tasks` model on held-out prompts.

The figures in the README come from `experiments/compare_samplers.py` on 200
prompts per task; this test is a small, fast slice of the same run.
"""

import jax
import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

import dllm
from dllm import evaluation
from dllm.decoding import DecodeConfig
from dllm.tasks import suite_examples
from experiments.common import REPO_ROOT

SAMPLER_YAMLS = sorted(p.stem for p in (REPO_ROOT / "configs" / "sampler").glob("*.yaml"))
COMPOSITIONS = {
    "early_commit(threshold)": {"_target_": "samplers.early_commit.EarlyCommit",
                                "inner": {"_target_": "samplers.threshold.Threshold", "tau": 0.9}},
    "adaptive_block(credit)": {"_target_": "samplers.adaptive_block.AdaptiveBlock", "delimiters": ["/"],
                               "inner": {"_target_": "samplers.credit.Credit"}},
}
DECODE = DecodeConfig(gen_length=24, block_length=8)


@pytest.fixture(scope="module")
def trained():
    model, tokenizer = dllm.from_pretrained(REPO_ROOT / "checkpoints" / "tiny-tasks")
    examples = suite_examples("test", 3)  # 3 held-out prompts of each of the 10 tasks
    return model, tokenizer, examples


def run(trained, spec, decode=DECODE):
    model, tokenizer, examples = trained
    sampler = instantiate(spec, _convert_="all")
    return evaluation.evaluate_examples(model, tokenizer, sampler, examples, decode, batch_size=30,
                                        key=jax.random.key(0), prompt_width=24)["summary"]


def test_checkpoint_metadata(trained):
    model, tokenizer, _ = trained
    assert model.config.vocab_size == tokenizer.vocab_size == 57
    assert tokenizer.special_ids["mask"] == 2 and tokenizer.special_ids["eos"] == 1


@pytest.mark.parametrize("name", SAMPLER_YAMLS + list(COMPOSITIONS))
def test_sampler_on_trained_model(trained, name):
    spec = COMPOSITIONS.get(name) or OmegaConf.to_container(OmegaConf.load(REPO_ROOT / f"configs/sampler/{name}.yaml"))
    summary = run(trained, spec)
    assert summary["accuracy"] >= 0.9, summary
    if name == "low_confidence":  # one token per step
        assert summary["mean_nfe"] == 24
    else:  # a parallel rule must actually decode in parallel on a trained model
        assert summary["mean_nfe"] < 12, summary


def test_cached_threshold_on_trained_model(trained):
    spec = {"_target_": "samplers.threshold.Threshold", "tau": 0.9}
    for mode in ("prefix", "dual"):
        summary = run(trained, spec, DecodeConfig(gen_length=24, block_length=8, cache=mode))
        assert summary["accuracy"] >= 0.9 and summary["mean_nfe"] < 12, (mode, summary)
