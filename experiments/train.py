"""Train a masked-diffusion model: the Hydra entry point of `dllm.training`.

    python -m experiments.train model=tiny_tasks train=tiny_tasks     # the bundled tiny-tasks model
    python -m experiments.train model=tasks_base train=tasks_base     # the bundled tasks-base model
    python -m experiments.train model=text_base train=text_base       # the bundled text-base model
    python -m experiments.train train=smoke model=tiny_tasks train.steps=20   # a CPU smoke run
    python -m experiments.train model=tasks_base train=tasks_base layout=gpu_train  # cuDNN attention on a GPU

`cfg.model` fills `ModelConfig`, `cfg.train` fills `TrainConfig`, `cfg.data`
fills `DataConfig`, `cfg.layout` the train step's attention kernel and scan unroll (`dllm.Layout`,
`dllm.training.check_training_layout`) and `cfg.mesh` fills `dllm.sharding.MeshConfig` (see
configs/train.yaml; `mesh=fsdp_tensor` shards the parameters). The run folder is
`train.workdir`: checkpoints/, metrics.jsonl, and the final model/ that
`dllm.from_pretrained` loads. Running the same command again resumes.
"""

from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from dllm.data import DataConfig, make_data
from dllm.models.config import ModelConfig
from dllm.sharding import MeshConfig
from dllm.training import TrainConfig, TrainResult, train
from experiments.common import run_layout


def run(cfg: DictConfig) -> TrainResult:
    """Builds the configs and the data from a composed Hydra config and trains."""
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every save at INFO
    container = OmegaConf.to_container(cfg, resolve=True)
    model_config = ModelConfig(**container["model"])
    train_config = TrainConfig(**container["train"])
    data_config = DataConfig(**container.get("data", {}))
    mesh_config = MeshConfig(**container["mesh"]) if "mesh" in container else None
    model_layout = run_layout(cfg)
    data = make_data(data_config, train_config.batch_size, train_config.seed)
    metadata = {"command": " ".join(["python -m experiments.train", *sys.argv[1:]]),
                "hydra_config": container}
    result = train(model_config, train_config, data, mesh_config=mesh_config, metadata=metadata,
                   model_layout=model_layout)
    print(f"step {result.step}: model saved to {result.model_path}")
    return result


@hydra.main(config_path="../configs", config_name="train", version_base=None)
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
