"""Learn2PD's learned filter, one package: the rule (`rule.LearnedFilter`), the filter's features and
network with its checkpoint (`filter`), the oracle data (`oracle`) and the trainer (`training`).

Bao et al. 2025, "Learning to Parallel: Accelerating Diffusion LLMs via Learnable Parallel
Decoding" (arXiv 2509.25188); each module's docstring names the reference code and our deviations.
`python -m experiments.train_filter` runs oracle data -> training -> evaluation.
"""

from samplers.learned_filter.filter import (FEATURES, FilterMLP, FilterWeights, check_features, feature_values,
                                            load_filter, resolve_filter_path, save_filter, stack_features)
from samplers.learned_filter.oracle import (OracleConfig, OracleData, build_oracle_data, decode_oracle_batch,
                                            format_analysis, oracle_analysis, settled_steps)
from samplers.learned_filter.rule import DEFAULT_FILTER, LearnedFilter
from samplers.learned_filter.training import FilterTrainConfig, FilterTrainResult, split_examples, train_filter

__all__ = ["DEFAULT_FILTER", "FEATURES", "FilterMLP", "FilterTrainConfig", "FilterTrainResult", "FilterWeights",
           "LearnedFilter", "OracleConfig", "OracleData", "build_oracle_data", "check_features", "decode_oracle_batch",
           "feature_values", "format_analysis", "load_filter", "oracle_analysis", "resolve_filter_path", "save_filter", "settled_steps",
           "split_examples", "stack_features", "train_filter"]
