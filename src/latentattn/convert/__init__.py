"""Post-hoc conversion of trained MHA/GQA/MQA models to MLA (TransMLA / MHA2MLA style), and the
kv-head merging baseline.

    layer.py        one attention layer → MLA: shared RoPE key, joint low-rank K/V, scales, biases
    rope_split.py   which key dims keep RoPE in the shared k_pe (RoRoPE), which lose it
    moments.py      second moments of a layer's inputs, accumulated in chunks
    weighting.py    the attention objective's metric: what K/V errors cost the attention output
    attention_moments.py  what the source's attention does with its inputs on calibration
    refit.py        the latent and each head's up-projections fitted to that attention
    model.py        whole models, calibrated block by block with bounded memory
    merge.py        the baseline: fewer kv heads by averaging
    calibration.py  calibration tokens from a text file or the built-in corpus
    checkpoint.py   `latentattn convert`: a checkpoint in, a checkpoint out

What a converted MLA model may use that DeepSeek-V3's checkpoint format cannot hold (its config marks
it): `attention.rope.frequencies` (k_pe's frequencies as a list, e.g. repeated per source kv head or
from a llama3/YaRN source), `attention.norm_eps` far above 1e-6 (kv_norm in its linear regime until
healed), `attention.bias` (the source's q/k/v biases), `attention.qk_nope_head_dim == 0`.
"""

from latentattn.convert.attention_moments import AttentionMoments
from latentattn.convert.checkpoint import ConversionResult, convert_checkpoint, convert_model
from latentattn.convert.layer import METHODS, ConversionConfig, Method, gqa_to_mla
from latentattn.convert.merge import merge_kv_heads
from latentattn.convert.model import layer_input_moments, model_to_mla
from latentattn.convert.moments import Moments

__all__ = [
    "METHODS",
    "AttentionMoments",
    "ConversionConfig",
    "ConversionResult",
    "Method",
    "Moments",
    "convert_checkpoint",
    "convert_model",
    "gqa_to_mla",
    "layer_input_moments",
    "merge_kv_heads",
    "model_to_mla",
]
