"""The experiment config: its schema (`mllm.config.schema`) and its loader (`mllm.config.loader`).

mllm's own modules import the schema module directly (one floor, not three); this package is the public face.

    mllm validate configs/default.yaml --set merge.method=ties
"""

from mllm.config.loader import apply_override, expand_env, format_validation_error, load_config, set_value
from mllm.config.schema import (
    DataConfig,
    DatasetConfig,
    EvaluateConfig,
    ExperimentConfig,
    FinetuneConfig,
    LabelKind,
    LabelScheme,
    MergeConfig,
    MergeMethod,
    ModelConfig,
    PromoteConfig,
    SearchConfig,
    Section,
    SentimentCuts,
    TrackingConfig,
)

__all__ = [
    "DataConfig", "DatasetConfig", "EvaluateConfig", "ExperimentConfig", "FinetuneConfig", "LabelKind", "LabelScheme",
    "MergeConfig", "MergeMethod", "ModelConfig", "PromoteConfig", "SearchConfig", "Section", "SentimentCuts",
    "TrackingConfig", "apply_override", "expand_env", "format_validation_error", "load_config", "set_value",
]
