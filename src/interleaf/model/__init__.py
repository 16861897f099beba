"""interleaf.model: InternViT + pixel shuffle + MLP projector + decoder LLM (InternVL family).

Public API::

    from interleaf.model import load_checkpoint, save_checkpoint, init_model
    model, tokenizer = load_checkpoint("ckpt_dir")            # either layout, auto-detected
    out = model(input_ids=ids, pixel_values=tiles, attention_mask=mask)   # out.logits [B, S, V]

Exports are lazy so that ``interleaf.model.cli`` (and so ``interleaf --help``) does not import torch.
"""

from __future__ import annotations

from interleaf import lazy_exports

_EXPORTS = {
    "KVCache": "interleaf.model.cache",
    "load_checkpoint": "interleaf.model.checkpoint",
    "save_checkpoint": "interleaf.model.checkpoint",
    "InternVLConfig": "interleaf.model.config",
    "LLMConfig": "interleaf.model.config",
    "VisionConfig": "interleaf.model.config",
    "InternVLChatModel": "interleaf.model.internvl",
    "DecoderLayer": "interleaf.model.llm",
    "DecoderLM": "interleaf.model.llm",
    "ModelOutput": "interleaf.model.llm",
    "PRESETS": "interleaf.model.presets",
    "build_model": "interleaf.model.presets",
    "init_model": "interleaf.model.presets",
    "preset_config": "interleaf.model.presets",
    "build_offline_tokenizer": "interleaf.model.tokenizer",
    "load_tokenizer": "interleaf.model.tokenizer",
    "VisionLLMv2Model": "interleaf.model.visionllm",
    "init_visionllm": "interleaf.model.visionllm",
    "load_visionllm": "interleaf.model.visionllm",
    "save_visionllm": "interleaf.model.visionllm",
}

__all__ = list(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
