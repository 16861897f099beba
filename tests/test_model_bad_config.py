"""Config fields of the wrong type or value: one-line ConfigErrors naming the file and the key (no
TypeError / KeyError / ZeroDivisionError from deep inside the model), and keys that would otherwise be
silently ignored."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from interleaf.errors import ConfigError, InputError
from interleaf.model import InternVLConfig, build_model, load_checkpoint
from test_model_config import PHI3_MINI, QWEN2_05B, VIT_300M, original


def _parse(mutate, layout="original"):
    raw = original(json.loads(json.dumps(QWEN2_05B)))
    raw["vision_config"] = dict(VIT_300M)
    mutate(raw)
    return InternVLConfig.from_dict(raw, "ckpt/config.json")


def _rope(value):
    return lambda c: c["llm_config"].update(rope_scaling=value)


BAD = [
    # wrong types
    (lambda c: c["llm_config"].update(head_dim="x"), "llm_config.head_dim must be a positive int, got str"),
    (lambda c: c["llm_config"].update(eos_token_id="x"), "llm_config.eos_token_id must be a token id"),
    (lambda c: c["llm_config"].update(eos_token_id=[2, "x"]), "llm_config.eos_token_id must be a token id"),
    (lambda c: c["llm_config"].update(bos_token_id=-1), "llm_config.bos_token_id must be a token id"),
    # an end token the model can never generate (its logits end at vocab_size)
    (lambda c: c["llm_config"].update(eos_token_id=151655), r"llm_config.eos_token_id 151655 is past the vocabulary \(vocab_size 151655\)"),
    (lambda c: c["llm_config"].update(eos_token_id=[151645, 10**6]), "llm_config.eos_token_id 1000000 is past the vocabulary"),
    (lambda c: c.update(force_image_size="448"), "force_image_size must be a positive int, got str"),
    (lambda c: c["llm_config"].update(hidden_size=896.0), "llm_config.hidden_size must be a positive int, got float"),
    (lambda c: c["llm_config"].update(rms_norm_eps="1e-6"), "llm_config.rms_norm_eps must be a positive number"),
    (lambda c: c["llm_config"].update(rope_theta="1e6"), "llm_config.rope_theta must be a positive number"),
    (lambda c: c["llm_config"].update(max_position_embeddings=None, vocab_size=True), "llm_config.vocab_size"),
    (lambda c: c["vision_config"].update(patch_size="14"), "vision_config.patch_size must be a positive int"),
    (lambda c: c["vision_config"].update(image_size=[448, 224]), "vision_config.image_size must be a positive int or a square"),
    (lambda c: c["vision_config"].update(layer_norm_eps=[1e-6]), "vision_config.layer_norm_eps must be a positive number"),
    (lambda c: c["vision_config"].update(qkv_bias="true"), "vision_config.qkv_bias must be true or false, got str"),
    (lambda c: c["vision_config"].update(drop_path_rate=1.5), r"vision_config.drop_path_rate must be a number in \[0, 1\)"),
    (lambda c: c.update(use_thumbnail="false"), "use_thumbnail must be true or false, got str"),
    (lambda c: c.update(dynamic_image_size=2), "dynamic_image_size must be true or false, got 2"),
    (lambda c: c.update(pad2square="no"), "pad2square must be true or false"),
    (lambda c: c.update(system_message=5), "system_message must be a string, got int"),
    # impossible values (ZeroDivisionError before)
    (lambda c: c["llm_config"].update(num_attention_heads=0), "llm_config.num_attention_heads must be a positive int, got 0"),
    (lambda c: c["llm_config"].update(num_key_value_heads=0), "llm_config.num_key_value_heads must be a positive int, got 0"),
    (lambda c: c["vision_config"].update(patch_size=0), "vision_config.patch_size must be a positive int"),
    (lambda c: c["vision_config"].update(num_attention_heads=0), "vision_config.num_attention_heads must be a positive int"),
    (lambda c: c["llm_config"].update(hidden_size=900), "llm_config.hidden_size .900. is not a multiple of num_attention_heads"),
    (lambda c: c.update(max_dynamic_patch=0), "max_dynamic_patch must be a positive int, got 0"),
    (lambda c: c.update(min_dynamic_patch=0), "min_dynamic_patch must be a positive int, got 0"),
    (lambda c: c.update(min_dynamic_patch=8, max_dynamic_patch=6), r"min_dynamic_patch \(8\) is above max_dynamic_patch \(6\)"),
    # rope scaling: incomplete or not an object (KeyError / silently plain RoPE before)
    (_rope("linear"), "llm_config.rope_scaling must be an object"),
    (_rope(["linear", 2.0]), "llm_config.rope_scaling must be an object"),
    (_rope({"type": "linear"}), "llm_config.rope_scaling of type 'linear' needs the key 'factor'"),
    (_rope({"rope_type": "dynamic"}), "llm_config.rope_scaling of type 'dynamic' needs the key 'factor'"),
    (_rope({"type": "linear", "factor": "2"}), "llm_config.rope_scaling.factor must be a positive number"),
    (_rope({"type": "su"}), "llm_config.rope_scaling of type 'su' needs the key 'short_factor'"),
    (_rope({"type": "su", "short_factor": [1.0] * 32}), "needs the key 'long_factor'"),
    (_rope({"type": "su", "short_factor": [1.0] * 5, "long_factor": [1.0] * 32}),
     r"llm_config.rope_scaling.short_factor must be a list of 32 numbers \(head_dim / 2\), got 5 entries"),
    (_rope({"type": "llama3", "factor": 8.0}), "needs the key 'low_freq_factor'"),
    (_rope({"type": 3}), "llm_config.rope_scaling.type must be a string"),
    # sliding windows are not implemented: refused where they would take effect
    (lambda c: c["llm_config"].update(use_sliding_window=True, sliding_window=4096),
     "llm_config.sliding_window 4096 is shorter than max_position_embeddings 32768"),
    (lambda c: c["llm_config"].update(use_sliding_window="yes"), "llm_config.use_sliding_window must be true or false"),
    # normalisation other than ImageNet's
    (lambda c: c.update(normalize_type="siglip"), "normalize_type 'siglip' is not supported"),
]  # fmt: skip


@pytest.mark.parametrize("mutate, message", BAD)
def test_bad_fields_are_one_line_errors_naming_file_and_key(mutate, message):
    with pytest.raises(ConfigError, match=message) as info:
        _parse(mutate)
    text = str(info.value)
    assert text.startswith("ckpt/config.json: ") and "\n" not in text


def test_wrong_typed_config_never_reaches_the_model(tmp_path, tiny_ckpt):
    """A wrong head_dim in a checkpoint used to fail as a TypeError in torch.empty."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, ckpt)
    raw = json.loads((ckpt / "config.json").read_text())
    raw["llm_config"]["head_dim"] = "x"
    (ckpt / "config.json").write_text(json.dumps(raw))
    with pytest.raises(
        ConfigError, match=r"config.json: llm_config.head_dim must be a positive int, got str"
    ):
        load_checkpoint(ckpt)


def test_harmless_values_are_accepted():
    """What real configs ship: sliding windows switched off or longer than the context, 0/1 flags,
    an explicit head_dim, ImageNet normalisation, a default rope_scaling, [n, n] sizes."""
    cfg = _parse(lambda c: (c["llm_config"].update(use_sliding_window=False, sliding_window=4096, head_dim=64),
                            c.update(use_thumbnail=1, normalize_type="imagenet", pad2square=0),
                            c["vision_config"].update(image_size=[448, 448], patch_size=[14])))  # fmt: skip
    assert cfg.use_thumbnail is True and cfg.llm.head_dim == 64 and cfg.vision.image_size == 448
    cfg = _parse(lambda c: c["llm_config"].update(use_sliding_window=True, sliding_window=32768))
    assert cfg.llm.rope_scaling is None
    cfg = _parse(
        lambda c: c["llm_config"].update(use_sliding_window=True, sliding_window=64, max_window_layers=24)
    )
    assert cfg.llm.num_hidden_layers == 24  # no layer at or above max_window_layers uses the window
    cfg = _parse(_rope({"type": "default"}))
    assert cfg.llm.rope_type == "default"
    phi3 = original(dict(PHI3_MINI), template="phi3-chat")  # Phi-3-mini-128k: window 262144 > 131072
    assert InternVLConfig.from_dict(phi3).llm.family == "phi3"
    with pytest.raises(ConfigError, match="sliding_window 2047 is shorter than max_position_embeddings 4096"):
        InternVLConfig.from_dict(original(dict(PHI3_MINI, sliding_window=2047, max_position_embeddings=4096)))


# ----------------------------------------------------------------------------- image_token_id (hf layout)
def test_hf_config_without_image_token_id_takes_the_tokenizers(tmp_path, tiny_ckpt_hf):
    ckpt = tmp_path / "hf"
    shutil.copytree(tiny_ckpt_hf, ckpt)
    raw = json.loads((ckpt / "config.json").read_text())
    del raw["image_token_id"]
    (ckpt / "config.json").write_text(json.dumps(raw))
    # config alone: transformers' default, as InternVLConfig would use
    assert InternVLConfig.from_file(ckpt / "config.json").image_token_id == 151667
    model, tok = load_checkpoint(ckpt)
    ctx = tok.convert_tokens_to_ids("<IMG_CONTEXT>")
    assert ctx != 151667 and model.config.img_context_token_id == model.config.image_token_id == ctx
    ids = torch.tensor([[1, 2] + [ctx] * model.num_image_token + [3]])
    out = model(input_ids=ids, pixel_values=torch.randn(1, 3, 448, 448))
    assert out.logits.shape[:2] == (1, ids.shape[1])


def test_token_count_error_names_the_image_token_id():
    from interleaf.model import preset_config

    cfg = preset_config("tiny", vocab_size=128)
    cfg.img_context_token_id = None
    cfg.layout = "hf"  # an hf config without image_token_id, loaded without a tokenizer
    model = build_model(cfg, seed=0)
    with pytest.raises(InputError, match=r"0 <IMG_CONTEXT> tokens \(image token id 151667\) but 256"):
        model(input_ids=torch.tensor([[1, 2, 3]]), pixel_values=torch.randn(1, 3, 448, 448))


# ----------------------------------------------------------------------------- rope_scaling on save
def test_original_layout_writes_rope_scaling_as_upstream_validates_it():
    cfg = InternVLConfig.from_dict(original(dict(PHI3_MINI), template="phi3-chat"))
    llm = cfg.to_original_dict()["llm_config"]
    rope = llm["rope_scaling"]
    # Phi3Config._rope_scaling_validation (remote code): exactly these three keys, type su or yarn
    assert set(rope) == {"type", "short_factor", "long_factor"} and rope["type"] == "su"
    assert len(rope["short_factor"]) == len(rope["long_factor"]) == 3072 // 32 // 2
    assert llm["original_max_position_embeddings"] == 4096
    again = InternVLConfig.from_dict(cfg.to_original_dict())
    assert again.llm == cfg.llm
    # from the hf layout (transformers 5 writes rope_parameters with more keys): same maths on re-read
    hf = InternVLConfig.from_dict(cfg.to_hf_dict())
    back = InternVLConfig.from_dict(hf.to_original_dict())
    assert set(back.to_original_dict()["llm_config"]["rope_scaling"]) == {
        "type",
        "short_factor",
        "long_factor",
    }
    for a, b in ((hf.llm, back.llm), (cfg.llm, back.llm)):
        assert a.rope_type == b.rope_type == "longrope"
        assert a.original_max_position_embeddings == b.original_max_position_embeddings
        assert a.rope_scaling["short_factor"] == b.rope_scaling["short_factor"]
    # a non-default attention factor cannot be expressed there: refused, not dropped
    hf.llm.rope_scaling["attention_factor"] = 1.5
    with pytest.raises(ConfigError, match="attention_factor cannot be written in the original layout"):
        hf.to_original_dict()


def test_internlm2_rope_scaling_has_exactly_type_and_float_factor():
    from test_model_config import INTERNLM2_18B

    raw = original(
        dict(INTERNLM2_18B, rope_scaling={"type": "dynamic", "factor": 2}), template="internlm2-chat"
    )
    cfg = InternVLConfig.from_dict(raw)
    rope = cfg.to_original_dict()["llm_config"]["rope_scaling"]
    assert rope == {"type": "dynamic", "factor": 2.0} and isinstance(rope["factor"], float)
    assert InternVLConfig.from_dict(cfg.to_original_dict()).llm.rope_scaling["factor"] == 2.0


def test_longrope_rotary_embedding_is_unchanged_by_the_save():
    from interleaf.model.llm import RotaryEmbedding

    cfg = InternVLConfig.from_dict(original(dict(PHI3_MINI), template="phi3-chat"))
    hf = InternVLConfig.from_dict(cfg.to_hf_dict())
    back = InternVLConfig.from_dict(hf.to_original_dict())
    pos = torch.arange(5000)[None]
    for a in (hf.llm, back.llm):
        cos, sin = RotaryEmbedding(a)(pos)
        cos0, sin0 = RotaryEmbedding(cfg.llm)(pos)
        torch.testing.assert_close((cos, sin), (cos0, sin0), rtol=0, atol=0)
    assert not math.isnan(float(cos.sum()))


def test_a_visionllm_checkpoint_names_its_own_loader(tmp_path, capsys):
    """`interleaf chat` / `load_checkpoint` on a VisionLLM v2 folder said only "unknown config key
    'visionllmv2'"; it now says which commands load it."""
    from interleaf.cli import main
    from interleaf.model.visionllm import init_visionllm, load_visionllm, save_visionllm

    model, tok = init_visionllm("tiny", seed=0)
    folder = save_visionllm(model, tok, tmp_path / "vl")
    with pytest.raises(ConfigError, match=r"a VisionLLM v2 checkpoint: use `interleaf visionllm ask`"):
        load_checkpoint(folder)
    assert main(["chat", str(folder), "hi"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "interleaf visionllm ask" in err
    assert load_visionllm(folder)[0].gdino is not None  # its own loader still reads it


def test_an_lcl_checkpoint_names_its_own_commands(tmp_path):
    from interleaf.model.lcl import LCLConfig, LCLModel, load_lcl, save_lcl

    config = LCLConfig(image_size=32, patch_size=16, vision_width=64, vision_layers=1, vision_heads=2,
                       text_width=64, text_heads=2, text_layers=1, embed_dim=64, pool_heads=2,
                       context_length=16)  # fmt: skip
    folder = save_lcl(LCLModel(config), tmp_path / "lcl")
    with pytest.raises(ConfigError, match=r"an LCL checkpoint .*`interleaf lcl retrieval`"):
        load_checkpoint(folder)
    assert load_lcl(folder).config == config


def _qwen3(c):
    """QWEN2_05B's llm_config restated as a Qwen3 one (as InternVL3.5 ships it)."""
    c["llm_config"].update(architectures=["Qwen3ForCausalLM"], model_type="qwen3")


def test_qwen3_config_reads_as_transformers_reads_it():
    from transformers import Qwen3Config

    cfg = _parse(_qwen3).llm
    # no head_dim: transformers' Qwen3Config default (128), not hidden_size / heads (64)
    assert cfg.family == "qwen3" and cfg.qk_norm and cfg.head_dim == Qwen3Config().head_dim == 128
    assert not cfg.qkv_bias and not cfg.o_bias
    cfg = _parse(lambda c: (_qwen3(c), c["llm_config"].update(attention_bias=True, head_dim=64))).llm
    assert cfg.qkv_bias and cfg.o_bias and cfg.head_dim == 64
    for mutate, message in [
        (lambda c: c["llm_config"].update(attention_bias="yes"), "llm_config.attention_bias must be true or false"),
        (lambda c: c["llm_config"].update(use_sliding_window=True, sliding_window=4096),
         "llm_config.sliding_window 4096 is shorter than max_position_embeddings"),
    ]:  # fmt: skip
        with pytest.raises(ConfigError, match=message):
            _parse(lambda c, m=mutate: (_qwen3(c), m(c)))


def test_qwen3_checkpoint_without_its_qk_norms_names_them(tmp_path):
    from safetensors.torch import load_file, save_file

    from interleaf.errors import CheckpointError
    from interleaf.model import init_model

    path = init_model("tiny-qwen3", tmp_path / "q3", seed=2)
    tensors = load_file(str(path / "model.safetensors"))
    del tensors["language_model.model.layers.1.self_attn.k_norm.weight"]
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"layers\.1\.self_attn\.k_norm\.weight") as info:
        load_checkpoint(path)
    assert "\n" not in str(info.value)


YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}  # Qwen3's long context


def test_unimplemented_rope_scalings_are_refused_naming_the_supported_ones(tmp_path):
    """Qwen3's model cards add a yarn ``rope_scaling`` for long inputs: read from either spelling. A type
    not implemented (transformers' ``proportional``) is refused from a file with the supported types
    named; set in code (an init-model override), building the model refuses it rather than running
    plain RoPE under a config that says otherwise."""
    from interleaf.model import init_model

    for key, value in (("rope_scaling", dict(YARN)), ("rope_parameters", {**YARN, "rope_theta": 1e6})):
        llm = _parse(lambda c, k=key, v=value: (_qwen3(c), c["llm_config"].update({k: v}))).llm
        assert llm.rope_type == "yarn" and llm.rope_scaling["factor"] == 4.0
    other = {"rope_type": "proportional", "factor": 2.0}
    supported = (
        r"unsupported rope scaling type 'proportional' \(supported: linear, dynamic, longrope, llama3, yarn\)"
    )
    with pytest.raises(ConfigError, match=r"llm_config\.rope_scaling: " + supported):
        _parse(lambda c: (_qwen3(c), c["llm_config"].update(rope_scaling=dict(other))))
    with pytest.raises(ConfigError, match=r"llm_config\.rope_parameters: " + supported):
        _parse(lambda c: (_qwen3(c), c["llm_config"].update(rope_parameters={**other, "rope_theta": 1e6})))
    with pytest.raises(ConfigError, match=r"model override 'llm.rope_scaling': rope_scaling: " + supported):
        init_model("tiny-qwen3", tmp_path / "y", overrides={"llm.rope_scaling": dict(other)})
    assert not (tmp_path / "y" / "config.json").exists()
    # an LLMConfig built in code reaches the model unchecked: building refuses it
    from interleaf.model.llm import RotaryEmbedding
    from interleaf.model.presets import preset_config

    llm = preset_config("tiny-qwen3").llm
    llm.rope_scaling = dict(other)
    with pytest.raises(
        ConfigError, match="llm.rope_scaling: rope scaling type 'proportional' is not implemented"
    ):
        RotaryEmbedding(llm)
    with pytest.raises(ConfigError, match=r"llm_config\.rope_scaling\.truncate must be true or false"):
        _parse(lambda c: (_qwen3(c), c["llm_config"].update(rope_scaling={**YARN, "truncate": "no"})))


@pytest.mark.parametrize("layout", ["internvl_chat", "hf"])
def test_qk_norms_under_a_config_that_is_not_qwen3_say_so(tmp_path, layout):
    """A Qwen3 (InternVL3.5) checkpoint whose config names another LLM: the stray q/k norms are named and
    the error says whose they are."""
    from interleaf.errors import CheckpointError
    from interleaf.model import init_model

    path = init_model("tiny-qwen3", tmp_path / "q3", layout=layout, seed=2)
    raw = json.loads((path / "config.json").read_text())
    raw["llm_config" if layout == "internvl_chat" else "text_config"].update(
        architectures=["LlamaForCausalLM"], model_type="llama"
    )
    (path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(
        CheckpointError, match=r"tensors the config does not use: .*self_attn\.k_norm\.weight"
    ) as info:
        load_checkpoint(path)
    assert "q_norm/k_norm are a Qwen3 LLM's" in str(info.value) and "the config says llama" in str(info.value)
    assert "\n" not in str(info.value)


def test_a_top_level_original_max_position_embeddings_wins_for_yarn_and_llama3_as_in_transformers():
    """transformers 5 (``standardize_rope_params``, run again when the RoPE tables are computed) gives
    a top-level ``original_max_position_embeddings`` (Phi-3's spelling) priority over the one in the
    rope dict for yarn and llama3, and takes it when the dict has none: the same frequencies here."""
    from transformers import Qwen3Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from interleaf.model.llm import RotaryEmbedding

    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 32768}  # fmt: skip
    for rope in (dict(YARN), {"rope_type": "yarn", "factor": 4.0}, llama3):
        raw = {}

        def mutate(c, rope=rope, raw=raw):
            _qwen3(c)
            c["llm_config"].update(rope_scaling=dict(rope), original_max_position_embeddings=4096)
            raw.update(c["llm_config"])

        ours = RotaryEmbedding(_parse(mutate).llm)
        hf = Qwen3Config(**{k: v for k, v in raw.items() if k != "architectures"})
        inv_freq, attention = ROPE_INIT_FUNCTIONS[rope["rope_type"]](hf)
        assert hf.rope_parameters["original_max_position_embeddings"] == 4096
        torch.testing.assert_close(ours.inv_freq, inv_freq, rtol=1e-6, atol=0)
        assert ours.attention_factor == pytest.approx(attention, rel=1e-12)


def test_rope_scaling_overrides_are_checked_as_config_files_are(tmp_path):
    """A model override's rope_scaling failed as a bare KeyError when the model was built or saved
    (a yarn dict without factor, a llama3 one without its keys, a dict spelt with ``type`` only)."""
    from interleaf.model import init_model

    for rope, message in [
        ({"rope_type": "yarn"}, "rope_scaling of type 'yarn' needs the key 'factor'"),
        ({"rope_type": "llama3", "factor": 8.0}, "needs the key 'low_freq_factor'"),
        ("yarn", "rope_scaling must be an object"),
        ({"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6}, "set rope_theta as llm.rope_theta"),
    ]:
        with pytest.raises(ConfigError, match=r"model override 'llm.rope_scaling': .*" + message):
            init_model("tiny-qwen3", tmp_path / "x", overrides={"llm.rope_scaling": rope})
    path = init_model(
        "tiny-qwen3", tmp_path / "ok", overrides={"llm.rope_scaling": {"type": "linear", "factor": 2.0}}
    )
    model, _ = load_checkpoint(path)
    assert model.config.llm.rope_type == "linear" and model.config.llm.rope_scaling["factor"] == 2.0


@pytest.mark.parametrize("preset, layout, name", [
    ("tiny-llama", "internvl_chat", "llm_config: Llama"), ("tiny-llama", "hf", "text_config: Llama"),
    ("tiny-qwen3", "internvl_chat", "llm_config: Qwen3"), ("tiny-qwen3", "hf", "text_config: Qwen3"),
])  # fmt: skip
def test_one_attention_bias_cannot_say_different_q_and_o_biases(tmp_path, preset, layout, name):
    """Llama's and Qwen3's attention_bias covers q/k/v and o: such a model is refused when saved (the
    original layout used to write the q/k/v bias alone, and the checkpoint then missed o_proj.bias)."""
    from interleaf.model import init_model, save_checkpoint

    path = init_model(preset, tmp_path / "m", seed=1)
    model, tok = load_checkpoint(path)
    model.config.llm.qkv_bias, model.config.llm.o_bias = True, False
    with pytest.raises(ConfigError, match=name + " needs the same bias on q/k/v and o"):
        save_checkpoint(model, tok, tmp_path / "out", layout=layout)
