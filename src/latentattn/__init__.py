"""latentattn: DeepSeek's Multi-head Latent Attention (MLA), MHA/GQA/MQA baselines and their caches."""

import importlib.metadata

from latentattn.attention import MLA, GQAAttention, build_attention, choose_mla_path, mla_path_flops
from latentattn.caches import (
    KVCache,
    LatentCache,
    ModelCache,
    PagedLatentCache,
    PagedModelCache,
    QuantizedLatentCache,
)
from latentattn.config import GQAConfig, MLAConfig, RopeConfig, YarnConfig
from latentattn.layers import RMSNorm
from latentattn.model import LanguageModel, ModelConfig, get_preset
from latentattn.rope import RotaryEmbedding

__version__ = importlib.metadata.version("latentattn")  # one source: pyproject.toml

__all__ = [
    "MLA",
    "GQAAttention",
    "GQAConfig",
    "KVCache",
    "LanguageModel",
    "LatentCache",
    "MLAConfig",
    "ModelCache",
    "ModelConfig",
    "PagedLatentCache",
    "PagedModelCache",
    "QuantizedLatentCache",
    "RMSNorm",
    "RopeConfig",
    "RotaryEmbedding",
    "YarnConfig",
    "build_attention",
    "choose_mla_path",
    "get_preset",
    "mla_path_flops",
]
