"""Mono-InternVL checkpoints: the released Mono-InternVL-2B layout (config fields and weight names of the
real one, random tiny weights), lossless round trip, initialisation from an LLM, and clear errors."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from interleaf.errors import CheckpointError, ConfigError
from interleaf.model import init_model, load_checkpoint, save_checkpoint
from interleaf.model.checkpoint import llm_state_to_disk
from interleaf.model.mono_checkpoint import (
    init_mono_from_llm,
    load_any_checkpoint,
    load_mono_checkpoint,
    save_mono_checkpoint,
)
from interleaf.model.mono_internvl import VE_ARCH, MonoInternVLChatModel
from interleaf.model.tokenizer import build_offline_tokenizer

H, INTER, LAYERS, HEADS, KV, D = 64, 96, 2, 4, 2, 16
PATCH_C = 32


@pytest.fixture(scope="module")
def tokenizer():
    return build_offline_tokenizer(bos=True)


def _released_config(vocab: int) -> dict:
    """config.json as the released Mono-InternVL-2B writes it (InternVLChatConfig.to_dict with an
    InternLM2 VE llm_config and an InternVisionPatchConfig), at a tiny size."""
    return {
        "_commit_hash": None,
        "_name_or_path": "OpenGVLab/Mono-InternVL-2B",
        "architectures": ["InternVLChatModel"],
        "auto_map": {
            "AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
            "AutoModel": "modeling_internvl_chat.InternVLChatModel",
            "AutoModelForCausalLM": "modeling_internvl_chat.InternVLChatModel",
        },
        "downsample_ratio": 0.5,
        "dynamic_image_size": True,
        "force_image_size": 448,
        "llm_config": {
            "_name_or_path": "internlm/internlm2-chat-1_8b",
            "architectures": [VE_ARCH],
            "attn_implementation": "eager",
            "auto_map": {
                "AutoConfig": "configuration_internlm2.InternLM2Config",
                "AutoModel": "modeling_internlm2_ve.InternLM2VEForCausalLM",
                "AutoModelForCausalLM": "modeling_internlm2_ve.InternLM2VEForCausalLM",
            },
            "bias": False,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "hidden_act": "silu",
            "hidden_size": H,
            "initializer_range": 0.02,
            "intermediate_size": INTER,
            "max_position_embeddings": 32768,
            "model_type": "internlm2",
            "num_attention_heads": HEADS,
            "num_hidden_layers": LAYERS,
            "num_key_value_heads": KV,
            "pad_token_id": 2,
            "pretraining_tp": 1,
            "rms_norm_eps": 1e-05,
            "rope_scaling": {"factor": 2.0, "type": "dynamic"},
            "rope_theta": 1000000,
            "tie_word_embeddings": False,
            "torch_dtype": "bfloat16",
            "transformers_version": "4.37.2",
            "use_bfloat16": True,
            "use_cache": True,
            "vocab_size": vocab,
        },
        "max_dynamic_patch": 12,
        "min_dynamic_patch": 1,
        "model_type": "internvl_chat",
        "pad2square": False,
        "ps_version": "v2",
        "select_layer": -1,
        "template": "internlm2-chat",
        "torch_dtype": "bfloat16",
        "transformers_version": None,
        "use_backbone_lora": 0,
        "use_llm_lora": 0,
        "use_thumbnail": True,
        "vision_config": {
            "architectures": ["InternVisionPatchModel"],
            "attention_dropout": 0.0,
            "drop_path_rate": 0.0,
            "dropout": 0.0,
            "hidden_act": "gelu",
            "hidden_size": PATCH_C,
            "image_size": 448,
            "initializer_factor": 0.1,
            "initializer_range": 1e-10,
            "intermediate_size": 4 * PATCH_C,
            "layer_norm_eps": 1e-06,
            "model_type": "intern_vit_patch",
            "norm_type": "rms_norm",
            "num_attention_heads": 4,
            "num_channels": 3,
            "num_hidden_layers": 0,
            "patch_size": 14,
            "qk_normalization": False,
            "qkv_bias": False,
            "torch_dtype": "bfloat16",
            "use_bfloat16": True,
            "use_flash_attn": True,
        },
    }


def _released_weights(vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Tensors named as in the released checkpoint (InternLM2 fused wqkv, feed_forward / feed_forward_ve)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g) * 0.05

    w = {
        "vision_model.embeddings.class_embedding": r(1, 1, PATCH_C),
        "vision_model.embeddings.patch_embedding.weight": r(PATCH_C, 3, 14, 14),
        "vision_model.embeddings.patch_embedding.bias": r(PATCH_C),
        "vision_model.embeddings.position_embedding": r(1, 1 + 32 * 32, PATCH_C),
        "mlp1.0.weight": 1 + r(4 * PATCH_C),
        "mlp1.0.bias": r(4 * PATCH_C),
        "mlp1.1.weight": r(H, 4 * PATCH_C),
        "mlp1.1.bias": r(H),
        "mlp1.3.weight": r(H, H),
        "mlp1.3.bias": r(H),
        "language_model.model.tok_embeddings.weight": r(vocab, H),
        "language_model.model.norm.weight": 1 + r(H),
        "language_model.output.weight": r(vocab, H),
    }
    for i in range(LAYERS):
        p = f"language_model.model.layers.{i}."
        w[p + "attention.wqkv.weight"] = r((HEADS + 2 * KV) * D, H)
        w[p + "attention.wo.weight"] = r(H, HEADS * D)
        w[p + "attention_norm.weight"] = 1 + r(H)
        w[p + "ffn_norm.weight"] = 1 + r(H)
        for ffn in ("feed_forward", "feed_forward_ve"):
            w[p + f"{ffn}.w1.weight"] = r(INTER, H)
            w[p + f"{ffn}.w3.weight"] = r(INTER, H)
            w[p + f"{ffn}.w2.weight"] = r(H, INTER)
    return w


def _write(path: Path, config: dict, weights: dict, tokenizer) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def released(tmp_path_factory, tokenizer) -> Path:
    vocab = -(-len(tokenizer) // 64) * 64
    return _write(
        tmp_path_factory.mktemp("released") / "Mono-InternVL-2B-tiny",
        _released_config(vocab),
        _released_weights(vocab),
        tokenizer,
    )


def test_released_layout_loads_and_round_trips_losslessly(released, tmp_path):
    disk = load_file(str(released / "model.safetensors"))
    model, tok = load_mono_checkpoint(released)
    assert isinstance(model, MonoInternVLChatModel)
    assert model.config.num_image_token == 256 and model.config.template == "internlm2-chat"
    layer = model.language_model.model.layers[1]
    p = "language_model.model.layers.1."
    assert torch.equal(layer.feed_forward_ve.w1.weight, disk[p + "feed_forward_ve.w1.weight"])
    assert torch.equal(layer.feed_forward_ve.w2.weight, disk[p + "feed_forward_ve.w2.weight"])
    assert torch.equal(layer.mlp.gate_proj.weight, disk[p + "feed_forward.w1.weight"])
    assert torch.equal(layer.mlp.up_proj.weight, disk[p + "feed_forward.w3.weight"])
    assert torch.equal(
        model.vision_model.embeddings.patch_embedding.weight,
        disk["vision_model.embeddings.patch_embedding.weight"],
    )

    out = save_mono_checkpoint(model, tok, tmp_path / "resaved")
    again = load_file(str(out / "model.safetensors"))
    assert set(again) == set(disk)  # the released names, nothing more, nothing less
    for k in disk:
        assert torch.equal(again[k], disk[k]), k
    cfg = json.loads((out / "config.json").read_text())
    ref = _released_config(0)
    assert cfg["vision_config"]["model_type"] == "intern_vit_patch"
    assert cfg["llm_config"]["architectures"] == [VE_ARCH]
    for key in (
        "template",
        "ps_version",
        "downsample_ratio",
        "select_layer",
        "force_image_size",
        "max_dynamic_patch",
    ):
        assert cfg[key] == ref[key], key
    for key in (
        "hidden_size",
        "num_hidden_layers",
        "num_key_value_heads",
        "bias",
        "rms_norm_eps",
    ):
        assert cfg["llm_config"][key] == ref["llm_config"][key], key
    assert {k: cfg["llm_config"]["rope_scaling"][k] for k in ("type", "factor")} == ref["llm_config"][
        "rope_scaling"
    ]
    for key in ("hidden_size", "patch_size", "image_size"):
        assert cfg["vision_config"][key] == ref["vision_config"][key], key

    with pytest.raises(ConfigError, match="no transformers-native"):
        save_checkpoint(model, tok, tmp_path / "as-hf", layout="hf")

    model2, _ = load_any_checkpoint(out)  # dispatches on the config
    ids = torch.tensor([tok("<img>" + "<IMG_CONTEXT>" * 256 + "</img>\nwhat is it?")["input_ids"]])
    px = torch.randn(1, 3, 448, 448)
    with torch.no_grad():
        assert torch.equal(
            model(input_ids=ids, pixel_values=px).logits, model2(input_ids=ids, pixel_values=px).logits
        )


def _broken(released: Path, tmp_path: Path, edit) -> Path:
    dst = tmp_path / "broken"
    shutil.copytree(released, dst)
    weights = load_file(str(dst / "model.safetensors"))
    config = json.loads((dst / "config.json").read_text())
    edit(weights, config)
    save_file(weights, str(dst / "model.safetensors"))
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_missing_expert_weight_is_named(released, tmp_path):
    path = _broken(
        released, tmp_path, lambda w, c: w.pop("language_model.model.layers.1.feed_forward_ve.w2.weight")
    )
    with pytest.raises(
        CheckpointError, match=r"missing visual-expert tensors: .*layers\.1\.feed_forward_ve\.w2\.weight"
    ):
        load_mono_checkpoint(path)


def test_wqkv_with_wrong_rows_names_layer_and_file(released, tmp_path):
    name = "language_model.model.layers.1.attention.wqkv.weight"

    def cut(w, c):
        w[name] = w[name][:7].contiguous()

    path = _broken(released, tmp_path, cut)
    with pytest.raises(
        CheckpointError, match=rf"^{path.name}/model\.safetensors: tensor {re.escape(name)} has 7 rows"
    ):
        load_mono_checkpoint(path)


def test_extra_expert_weights_are_named(released, tmp_path):
    def add(w, c):
        w["language_model.model.layers.2.feed_forward_ve.w1.weight"] = torch.zeros(INTER, H)
        w["language_model.model.layers.0.self_attn.q_proj_ve.weight"] = torch.zeros(H, H)

    path = _broken(released, tmp_path, add)
    with pytest.raises(
        CheckpointError,
        match=r"config does not use: .*layers\.0\.self_attn\.q_proj_ve\.weight.*visual_attention_experts",
    ):
        load_mono_checkpoint(path)


def test_visual_expert_config_on_llm_without_experts(released, tmp_path):
    def strip(w, c):
        for k in [k for k in w if "feed_forward_ve" in k]:
            w.pop(k)

    path = _broken(released, tmp_path, strip)
    with pytest.raises(
        CheckpointError,
        match=r"declares visual experts .* has none: no tensors .*layers\.0\.feed_forward_ve\.w1\.weight",
    ):
        load_any_checkpoint(path)


def test_expert_weights_under_a_plain_config_are_named(tmp_path):
    base = init_model("tiny-internlm2", tmp_path / "plain")
    weights = load_file(str(base / "model.safetensors"))
    weights["language_model.model.layers.0.feed_forward_ve.w1.weight"] = torch.zeros(256, 128)
    save_file(weights, str(base / "model.safetensors"))
    with pytest.raises(
        CheckpointError, match=r"visual-expert tensors .*layers\.0\.feed_forward_ve\.w1\.weight.* plain LLM"
    ):
        load_any_checkpoint(base)


@pytest.mark.parametrize(
    "preset, layout, attention_experts",
    [
        ("tiny-internlm2", "internvl_chat", True),  # InternLM2
        ("tiny", "hf", False),  # Qwen2, the transformers-native layout
        ("tiny-phi3", "internvl_chat", False),
        ("tiny-llama", "hf", True),
        ("tiny-qwen3", "hf", True),  # Qwen3 (InternVL3.5): q/k norms shared by both modalities
    ],
)
def test_init_from_internvl_checkpoint_copies_ffn_to_experts(tmp_path, preset, layout, attention_experts):
    base_dir = init_model(preset, tmp_path / "ivl", seed=5, layout=layout)
    base, tok = load_checkpoint(base_dir)
    model, tok2 = init_mono_from_llm(base_dir, visual_attention_experts=attention_experts)
    assert len(tok2) == len(tok) and model.config.template == base.config.template
    for layer in model.language_model.model.layers:
        assert torch.equal(layer.feed_forward_ve.w1.weight, layer.mlp.gate_proj.weight)
        assert torch.equal(layer.feed_forward_ve.w3.weight, layer.mlp.up_proj.weight)
        assert torch.equal(layer.feed_forward_ve.w2.weight, layer.mlp.down_proj.weight)
        if attention_experts:
            assert torch.equal(layer.self_attn.q_proj_ve.weight, layer.self_attn.q_proj.weight)
            assert torch.equal(layer.self_attn.o_proj_ve.weight, layer.self_attn.o_proj.weight)
        assert layer.feed_forward_ve.w1.weight.data_ptr() != layer.mlp.gate_proj.weight.data_ptr()  # copies
    ids = torch.tensor([tok("a plain text question about the weather")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, base(input_ids=ids).logits)
    # saved and reloaded as a Mono checkpoint (attention experts included)
    out = save_mono_checkpoint(model, tok2, tmp_path / "mono")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["vision_config"]["model_type"] == "intern_vit_patch"
    assert cfg["llm_config"].get("visual_attention_experts", False) is attention_experts
    reloaded, _ = load_any_checkpoint(out)
    assert isinstance(reloaded, MonoInternVLChatModel)
    assert all(torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), model.state_dict().values()))


def test_init_from_bare_llm_checkpoint_grows_vocab_for_image_tokens(tmp_path, tokenizer):
    # a bare InternLM2 checkpoint whose vocabulary lacks the 9 InternVL tokens (they are the last ids)
    ivl, _ = load_checkpoint(init_model("tiny-internlm2", tmp_path / "ivl", seed=6))
    cfg = ivl.config.llm
    n_old = len(tokenizer) - 9
    sd = {
        k[len("language_model.") :]: v for k, v in ivl.state_dict().items() if k.startswith("language_model.")
    }
    sd["model.embed_tokens.weight"] = sd["model.embed_tokens.weight"][:n_old].clone()
    sd["lm_head.weight"] = sd["lm_head.weight"][:n_old].clone()
    llm_dir = tmp_path / "internlm2-bare"
    llm_dir.mkdir()
    save_file(
        {k: v.contiguous() for k, v in llm_state_to_disk(sd, cfg, "internlm2").items()},
        str(llm_dir / "model.safetensors"),
    )
    (llm_dir / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["InternLM2ForCausalLM"],
                "model_type": "internlm2",
                "hidden_size": cfg.hidden_size,
                "intermediate_size": cfg.intermediate_size,
                "num_hidden_layers": cfg.num_hidden_layers,
                "num_attention_heads": cfg.num_attention_heads,
                "num_key_value_heads": cfg.num_key_value_heads,
                "rms_norm_eps": cfg.rms_norm_eps,
                "rope_theta": cfg.rope_theta,
                "rope_scaling": {"type": "dynamic", "factor": 2.0},
                "bias": False,
                "vocab_size": n_old,
                "tie_word_embeddings": False,
            }
        )
    )
    tokenizer.save_pretrained(str(llm_dir))
    model, tok = init_mono_from_llm(llm_dir)
    emb = model.language_model.model.embed_tokens.weight
    assert emb.shape[0] == len(tok) and model.config.template == "internlm2-chat"
    assert torch.equal(emb[:n_old], sd["model.embed_tokens.weight"])
    assert torch.allclose(emb[n_old:], sd["model.embed_tokens.weight"].mean(0).expand(9, -1))
    assert model.config.img_context_token_id == tok.convert_tokens_to_ids("<IMG_CONTEXT>")
    layer = model.language_model.model.layers[1]
    assert torch.equal(layer.feed_forward_ve.w2.weight, layer.mlp.down_proj.weight)
    ids = torch.tensor([tok("hello there")["input_ids"]])
    with torch.no_grad():
        got = model(input_ids=ids).logits[..., :n_old]
        want = ivl(input_ids=ids).logits[..., :n_old]
    assert torch.equal(got, want)


@pytest.mark.parametrize(
    "preset", ["tiny", "tiny-phi3", "tiny-llama", "tiny-qwen3"]
)  # Qwen2/Phi-3/Llama/Qwen3
def test_init_from_bare_llm_of_every_family(tmp_path, preset):
    ivl_dir = init_model(preset, tmp_path / "ivl", seed=4)
    ivl, tok = load_checkpoint(ivl_dir)
    cfg = ivl.config.llm
    sd = {
        k[len("language_model.") :]: v for k, v in ivl.state_dict().items() if k.startswith("language_model.")
    }
    llm_dir = tmp_path / "bare"
    llm_dir.mkdir()
    disk = llm_state_to_disk(sd, cfg, cfg.family)
    save_file({k: v.contiguous().clone() for k, v in disk.items()}, str(llm_dir / "model.safetensors"))
    # the LLM's own transformers config.json, as InternVL embeds it (rope scaling and all)
    llm_config = json.loads((ivl_dir / "config.json").read_text())["llm_config"]
    (llm_dir / "config.json").write_text(json.dumps(llm_config))
    tok.save_pretrained(str(llm_dir))

    model, tok2 = init_mono_from_llm(llm_dir, visual_attention_experts=True)
    assert model.config.llm.family == cfg.family
    layer = model.language_model.model.layers[0]
    assert torch.equal(layer.feed_forward_ve.w1.weight, layer.mlp.gate_proj.weight)
    assert torch.equal(layer.self_attn.k_proj_ve.weight, layer.self_attn.k_proj.weight)
    ids = torch.tensor([tok("a plain text question about the weather")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, ivl(input_ids=ids).logits)
    reloaded, _ = load_any_checkpoint(save_mono_checkpoint(model, tok2, tmp_path / "mono"))
    assert all(torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), model.state_dict().values()))


def test_mono_presets_through_the_core_init_and_its_command(tmp_path):
    from interleaf.cli import main

    out = init_model("tiny-mono", tmp_path / "a", seed=1, overrides={"llm.num_hidden_layers": 1})
    model, _ = load_any_checkpoint(out)
    assert isinstance(model, MonoInternVLChatModel) and len(model.language_model.model.layers) == 1
    assert main(["init-model", "--preset", "tiny-mono", str(tmp_path / "b")]) == 0
    assert isinstance(load_any_checkpoint(tmp_path / "b")[0], MonoInternVLChatModel)
    with pytest.raises(ConfigError, match="internvl_chat layout only"):
        init_model("tiny-mono", tmp_path / "c", layout="hf")
    with pytest.raises(ConfigError, match="'llm.no_such_field'"):
        init_model("tiny", tmp_path / "d", overrides={"llm.no_such_field": 1})


def test_info_describes_the_patch_embedding_and_skip_counts_agree_in_number(released, capsys):
    from interleaf.cli import main
    from interleaf.train.data import skip_summary

    assert main(["info", str(released)]) == 0
    out = capsys.readouterr().out
    assert "Mono-InternVL = patch embedding (14px patches -> " in out and " x 0L)" not in out  # no ViT layers
    assert skip_summary({"bad_image": 1}) == "1 sample skipped (bad_image=1)"  # was "1 samples"
    assert skip_summary({"bad_image": 1, "missing_image": 2}).startswith("3 samples skipped")


def test_command_line_builds_from_llm_and_reports_errors_in_one_line(tmp_path, capsys):
    from interleaf.model.mono_checkpoint import main

    base = init_model("tiny-internlm2", tmp_path / "ivl", seed=7)
    assert main(["from-llm", str(base), str(tmp_path / "mono")]) == 0
    model, _ = load_mono_checkpoint(tmp_path / "mono")
    assert isinstance(model, MonoInternVLChatModel)
    assert main(["from-llm", str(tmp_path / "missing"), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "missing" in err and "\n" not in err


def test_command_line_refuses_bad_arguments_and_outputs_in_one_line(tmp_path, capsys):
    from interleaf.model.mono_checkpoint import main

    base = init_model("tiny-internlm2", tmp_path / "ivl", seed=7)
    afile = tmp_path / "afile"
    afile.write_text("x")
    bad_config = tmp_path / "bad-config"
    bad_config.mkdir()
    (bad_config / "config.json").write_text('{"llm_config": ')
    cases = [
        (["init", str(afile)], "afile: exists and is not a directory"),  # FileExistsError traceback before
        (["from-llm", str(base), str(tmp_path / "m1"), "--patch-hidden-size", "-1"], "patch_hidden_size"),
        (["from-llm", str(base), str(tmp_path / "m2"), "--template", "nope"], "unknown chat template 'nope'"),
        (["from-llm", str(bad_config), str(tmp_path / "m3")], "config.json: not valid JSON"),
    ]
    for argv, message in cases:
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, (argv, err)
    assert not (tmp_path / "m2").exists()  # refused before anything is written


def test_core_loader_and_interleaf_load_dispatch_to_mono(released):
    import interleaf

    model, _ = load_checkpoint(released)
    assert isinstance(model, MonoInternVLChatModel)
    chat = interleaf.load(str(released))
    assert isinstance(chat.model, MonoInternVLChatModel)


def test_command_line_into_a_closed_stdout_ends_quietly(tmp_path):
    # 'python -m interleaf.model.mono_checkpoint init OUT | head -0' ended in a traceback
    import sys

    from test_cli import _run_into_closed_pipe

    proc = _run_into_closed_pipe(
        [sys.executable, "-m", "interleaf.model.mono_checkpoint", "init", str(tmp_path / "m")]
    )
    assert (proc.returncode, proc.stderr) == (141, "")
    assert (tmp_path / "m" / "config.json").is_file()  # the work was done; only the output was lost


def test_init_model_command_offers_every_preset():
    from interleaf.model.cli import PRESET_NAMES
    from interleaf.model.mono_checkpoint import MONO_PRESETS
    from interleaf.model.presets import PRESETS

    assert set(PRESET_NAMES) == set(PRESETS) | set(MONO_PRESETS) and len(PRESET_NAMES) == len(
        set(PRESET_NAMES)
    )
