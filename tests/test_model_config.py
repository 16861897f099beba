"""Config parsing of both layouts, on configs shaped like the published ones."""

from __future__ import annotations

import pytest

from interleaf.errors import ConfigError
from interleaf.model import InternVLConfig

GENERIC = {"_name_or_path": "x", "output_attentions": False, "return_dict": True, "torch_dtype": "bfloat16",
           "transformers_version": "4.37.2", "use_bfloat16": True, "id2label": {"0": "LABEL_0"}}  # fmt: skip
VIT_300M = {"architectures": ["InternVisionModel"], "model_type": "intern_vit_6b", "hidden_size": 1024,
            "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 4096, "patch_size": 14,
            "image_size": 448, "num_channels": 3, "hidden_act": "gelu", "norm_type": "layer_norm",
            "layer_norm_eps": 1e-6, "qkv_bias": True, "qk_normalization": False, "initializer_factor": 1.0,
            "drop_path_rate": 0.0, "use_flash_attn": True, "capacity_factor": 1.2, "use_moe": False, **GENERIC}  # fmt: skip


def original(llm: dict, **top) -> dict:
    cfg = {"_commit_hash": None, "architectures": ["InternVLChatModel"], "model_type": "internvl_chat",
           "auto_map": {"AutoConfig": "configuration_internvl_chat.InternVLChatConfig"}, "downsample_ratio": 0.5,
           "dynamic_image_size": True, "force_image_size": 448, "llm_config": llm, "max_dynamic_patch": 12,
           "min_dynamic_patch": 1, "ps_version": "v2", "select_layer": -1, "template": "Hermes-2",
           "torch_dtype": "bfloat16", "use_backbone_lora": 0, "use_llm_lora": 0, "use_thumbnail": True,
           "vision_config": dict(VIT_300M), "pad2square": False, "image_fold": None, "hidden_size": llm["hidden_size"],
           "tie_word_embeddings": False, "output_attentions": False}  # fmt: skip
    cfg.update(top)
    return cfg


QWEN2_05B = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 896,
             "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
             "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "vocab_size": 151655,
             "sliding_window": 32768, "use_sliding_window": False, "max_window_layers": 21, "tie_word_embeddings": False,
             "layer_types": ["full_attention"] * 24, "moe_config": None, **GENERIC}  # fmt: skip
INTERNLM2_18B = {"architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2", "hidden_size": 2048,
                 "intermediate_size": 8192, "num_hidden_layers": 24, "num_attention_heads": 16,
                 "num_key_value_heads": 8, "max_position_embeddings": 32768, "rms_norm_eps": 1e-5,
                 "rope_theta": 1000000, "rope_scaling": {"type": "dynamic", "factor": 2.0}, "bias": False,
                 "vocab_size": 92553, "attn_implementation": "flash_attention_2", "pretraining_tp": 1,
                 "auto_map": {"AutoConfig": "configuration_internlm2.InternLM2Config"}, **GENERIC}  # fmt: skip
PHI3_MINI = {"architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "hidden_size": 3072,
             "intermediate_size": 8192, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
             "max_position_embeddings": 131072, "original_max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
             "rope_theta": 10000.0, "rope_scaling": {"type": "su", "short_factor": [1.0] * 48, "long_factor": [2.0] * 48},
             "sliding_window": 262144, "vocab_size": 32020, "embd_pdrop": 0.0, "resid_pdrop": 0.0, **GENERIC}  # fmt: skip


def test_original_qwen2_config():
    cfg = InternVLConfig.from_dict(original(QWEN2_05B), "c/config.json")
    assert (
        cfg.layout == "internvl_chat"
        and cfg.llm.family == "qwen2"
        and cfg.llm.qkv_bias
        and not cfg.llm.o_bias
    )
    assert (cfg.llm.head_dim, cfg.llm.num_key_value_heads, cfg.llm.rope_theta) == (64, 2, 1e6)
    assert cfg.vision.qkv_bias and cfg.vision.hidden_size == 1024 and cfg.num_image_token == 256
    assert cfg.template == "Hermes-2" and cfg.ps_version == "v2" and cfg.max_dynamic_patch == 12


def test_original_internlm2_and_phi3_configs():
    cfg = InternVLConfig.from_dict(original(INTERNLM2_18B, template="internlm2-chat"))
    assert cfg.llm.family == "internlm2" and not cfg.llm.qkv_bias
    assert (
        cfg.llm.rope_type == "dynamic" and cfg.llm.rope_scaling["factor"] == 2.0 and cfg.llm.head_dim == 128
    )
    cfg = InternVLConfig.from_dict(original(PHI3_MINI, template="phi3-chat"))
    assert cfg.llm.family == "phi3" and cfg.llm.rope_type == "longrope"  # "su" is the old name
    assert cfg.to_original_dict()["llm_config"]["rope_scaling"]["type"] == "su"  # spelling kept on save
    assert cfg.llm.original_max_position_embeddings == 4096 and cfg.llm.head_dim == 96


def test_ps_version_defaults_to_v1_when_absent():
    raw = original(QWEN2_05B)
    del raw["ps_version"]
    assert InternVLConfig.from_dict(raw).ps_version == "v1"


def test_hf_configs_in_both_transformers_styles():
    vision = {"model_type": "internvl_vision", "hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
              "intermediate_size": 4096, "image_size": [448, 448], "patch_size": [14, 14], "attention_bias": True,
              "use_qk_norm": False, "layer_scale_init_value": 0.1, "norm_type": "layer_norm", "use_mean_pooling": True,
              "architectures": ["InternVisionModel"]}  # fmt: skip
    text4 = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 2048, "intermediate_size": 8192,
             "num_hidden_layers": 24, "num_attention_heads": 16, "num_key_value_heads": 8, "vocab_size": 92553,
             "rope_theta": 1000000, "rope_scaling": {"type": "dynamic", "factor": 2.0}, "head_dim": 128}  # fmt: skip
    raw = {"architectures": ["InternVLForConditionalGeneration"], "model_type": "internvl", "downsample_ratio": 0.5,
           "image_seq_length": 256, "image_token_id": 92546, "projector_hidden_act": "gelu", "text_config": text4,
           "vision_config": vision, "vision_feature_layer": -1, "vision_feature_select_strategy": "default",
           "torch_dtype": "bfloat16", "transformers_version": "4.52.0.dev0"}  # fmt: skip
    cfg = InternVLConfig.from_dict(raw)
    assert cfg.layout == "hf" and cfg.llm.family == "llama" and cfg.img_context_token_id == 92546
    assert cfg.vision.qkv_bias and cfg.vision.image_size == 448 and cfg.vision.patch_size == 14
    assert cfg.llm.rope_type == "dynamic" and cfg.llm.rope_theta == 1e6 and cfg.ps_version == "v2"
    text5 = dict(text4)
    del text5["rope_scaling"], text5["rope_theta"]
    text5["rope_parameters"] = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1000000.0}
    cfg5 = InternVLConfig.from_dict(dict(raw, text_config=text5))
    assert (cfg5.llm.rope_type, cfg5.llm.rope_scaling["factor"], cfg5.llm.rope_theta) == ("dynamic", 2.0, 1e6)
    assert cfg5.llm.head_dim == cfg.llm.head_dim == 128 and cfg5.llm.num_key_value_heads == 8


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda c: c.update(some_new_knob=1), "unknown config key 'some_new_knob'"),
        (lambda c: c.update(template="vicuna"), "field 'template'"),
        (lambda c: c.update(downsample_ratio=0.25), "field 'downsample_ratio'"),
        (lambda c: c.update(select_layer="last"), "select_layer must be an int, got str"),
        (lambda c: c["llm_config"].update(num_key_value_heads=5), "num_key_value_heads"),
        (
            lambda c: c["llm_config"].update(rope_scaling={"type": "yarn", "factor": 2}),
            "rope_scaling of type 'yarn' needs the key 'original_max_position_embeddings'",
        ),
        (lambda c: c["vision_config"].update(norm_type="batch_norm"), "vision_config.norm_type must be"),
        (lambda c: c.update(llm_config=[]), "field 'llm_config' must be an object"),
    ],
)
def test_bad_configs_name_the_field(mutate, message):
    raw = original(dict(QWEN2_05B))
    raw["vision_config"] = dict(VIT_300M)
    mutate(raw)
    with pytest.raises(ConfigError, match=message) as info:
        InternVLConfig.from_dict(raw, "ckpt/config.json")
    assert str(info.value).startswith("ckpt/config.json") and "\n" not in str(info.value)


def test_not_an_internvl_config():
    with pytest.raises(ConfigError, match="not an InternVL config"):
        InternVLConfig.from_dict({"model_type": "llava", "text_config": None, "vision_config": {}}, "x.json")


def test_transformers_private_bookkeeping_keys_are_not_unknown_keys():
    """InternVL's ``to_dict`` copies ``__dict__``, so a config saved by a newer transformers may carry
    its private attributes; they say nothing about the model."""
    raw = original(dict(QWEN2_05B))
    raw["vision_config"] = dict(VIT_300M)
    plain = InternVLConfig.from_dict(dict(raw), "ckpt/config.json")
    raw.update(_attn_implementation_internal=None, _output_attentions=False)
    assert InternVLConfig.from_dict(raw, "ckpt/config.json") == plain


QWEN3_06B = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 1024, "head_dim": 128,
             "intermediate_size": 3072, "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8,
             "max_position_embeddings": 40960, "rms_norm_eps": 1e-6, "rope_theta": 1000000, "rope_scaling": None,
             "vocab_size": 151936, "attention_bias": False, "attention_dropout": 0.0, "sliding_window": None,
             "use_sliding_window": False, "max_window_layers": 28, "tie_word_embeddings": False,
             "bos_token_id": 151643, "eos_token_id": 151645, **GENERIC}  # fmt: skip


def test_internvl3_5_1b_configs_in_both_layouts_give_the_preset():
    """InternVL3.5-1B as published: ``llm_config`` (transformers 4.x, rope_theta) and the -HF
    ``text_config`` (transformers 5: rope_parameters, layer_types); both read as the preset's LLM."""
    from interleaf.model import preset_config

    want = preset_config("internvl3_5-1b").llm
    fields = ("family", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "rope_theta",
              "rope_scaling", "qkv_bias", "o_bias", "mlp_bias", "tie_word_embeddings", "qk_norm")  # fmt: skip
    orig = InternVLConfig.from_dict(original(dict(QWEN3_06B), template="internvl2_5"), "c/config.json")
    text = {k: v for k, v in QWEN3_06B.items() if k not in ("rope_theta", "rope_scaling", "torch_dtype")}
    text.update(rope_parameters={"rope_theta": 1000000.0, "rope_type": "default"}, dtype="bfloat16",
                layer_types=["full_attention"] * 28)  # fmt: skip
    hf = InternVLConfig.from_dict(
        {"model_type": "internvl", "text_config": text, "vision_config": {"model_type": "internvl_vision"},
         "image_token_id": 151671, "tie_word_embeddings": False},
        "c/config.json",
    )  # fmt: skip
    for cfg in (orig, hf):
        assert [getattr(cfg.llm, f) for f in fields] == [getattr(want, f) for f in fields]
