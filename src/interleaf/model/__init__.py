"""interleaf.model: InternViT + pixel shuffle + MLP projector + decoder LLM (InternVL family).

Public API (see ``/work/coord/CONTRACT_MODEL.md``)::

    from interleaf.model import load_checkpoint, save_checkpoint, init_model
    model, tokenizer = load_checkpoint("ckpt_dir")            # either layout, auto-detected
    out = model(input_ids=ids, pixel_values=tiles, attention_mask=mask)   # out.logits [B, S, V]
"""

from interleaf.model.cache import KVCache
from interleaf.model.checkpoint import load_checkpoint, save_checkpoint
from interleaf.model.config import InternVLConfig, LLMConfig, VisionConfig
from interleaf.model.internvl import InternVLChatModel
from interleaf.model.llm import DecoderLayer, DecoderLM, ModelOutput
from interleaf.model.presets import PRESETS, build_model, init_model, preset_config
from interleaf.model.tokenizer import build_offline_tokenizer, load_tokenizer

__all__ = [
    "InternVLConfig",
    "VisionConfig",
    "LLMConfig",
    "InternVLChatModel",
    "DecoderLM",
    "DecoderLayer",
    "ModelOutput",
    "KVCache",
    "load_checkpoint",
    "save_checkpoint",
    "load_tokenizer",
    "build_offline_tokenizer",
    "init_model",
    "build_model",
    "preset_config",
    "PRESETS",
]
