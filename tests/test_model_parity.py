"""interleaf vs transformers (the numerical reference), fp32, on random-weight checkpoints.

* whole model: transformers' ``InternVLForConditionalGeneration`` loads our saved ``-hf`` checkpoint;
  logits agree to 1e-4 across sizes, GQA ratios, tied/untied embeddings, ViT qk-norm / RMSNorm,
  tiles and images, Qwen2 vs Qwen3 (per-head q/k RMSNorm, decoupled head_dim) vs Llama text configs
  (InternLM2 goes to hf as Llama), RoPE scalings;
  greedy generation (our KV-cache loop) yields the same tokens as transformers' ``generate``.
* Phi-3 (no official hf InternVL conversion; transformers still builds it from our text_config, so it
  is in the matrix too): text-only logits vs ``Phi3ForCausalLM`` with longrope scaling,
  loading our original-layout fused ``qkv_proj`` / ``gate_up_proj`` tensors directly.
* InternLM2 fused ``wqkv``: checked against a re-statement of the upstream grouped split.
"""

from __future__ import annotations

import json

import pytest
import torch

from interleaf.model import InternVLChatModel, build_model, load_checkpoint, preset_config, save_checkpoint
from interleaf.model.checkpoint import read_weights
from interleaf.model.presets import _phi3_longrope
from interleaf.model.tokenizer import build_offline_tokenizer

ATOL = 1e-4


@pytest.fixture(scope="module")
def tokenizer():
    return build_offline_tokenizer()


def _config(tokenizer, family="qwen2", vision=None, **llm):
    preset = {
        "qwen2": "tiny", "qwen3": "tiny-qwen3", "llama": "tiny-llama", "internlm2": "tiny-internlm2",
        "phi3": "tiny-phi3",
    }[family]  # fmt: skip
    cfg = preset_config(preset, vocab_size=-(-len(tokenizer) // 64) * 64)
    for k, v in (vision or {}).items():
        setattr(cfg.vision, k, v)
    for k, v in llm.items():
        setattr(cfg.llm, k, v)
    cfg.llm.__post_init__()
    cfg.img_context_token_id = tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    return cfg


def _prompt_ids(tokenizer, tiles_per_image, text="describe the image in detail please"):
    body = "".join(
        f"Image-{i + 1}: <img>" + "<IMG_CONTEXT>" * 256 * n + "</img>\n"
        for i, n in enumerate(tiles_per_image)
    )
    return tokenizer("<|im_start|>user\n" + body + text + "<|im_end|><|im_start|>assistant\n").input_ids


def _hf_model(path):
    from transformers import InternVLForConditionalGeneration

    return InternVLForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()


CASES = {
    # name: (family, vision overrides, llm overrides, tiles per image)
    "qwen2-gqa2-untied-1tile": ("qwen2", {}, {}, [1]),
    "qwen2-mqa-tied-qknorm-rms-2images": (
        "qwen2",
        {
            "qk_normalization": True,
            "norm_type": "rms_norm",
            "qkv_bias": False,
            "hidden_size": 48,
            "num_attention_heads": 3,
        },
        {
            "tie_word_embeddings": True,
            "num_attention_heads": 4,
            "num_key_value_heads": 1,
            "hidden_size": 96,
            "num_hidden_layers": 3,
        },
        [2, 1],
    ),  # fmt: skip
    "internlm2-as-llama-gqa4-dynamic-ntk": (
        "internlm2",
        {"num_hidden_layers": 1},
        {
            "num_attention_heads": 8,
            "num_key_value_heads": 2,
            "max_position_embeddings": 200,
        },  # seq > 200: NTK on
        [1],
    ),
    "llama-tied-llama3-rope-3tiles": (
        "llama",
        {},
        {
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
            "rope_theta": 500000.0,
            "head_dim": 48,
        },
        [3],
    ),  # fmt: skip
    "phi3-longrope-long-factors": (
        "phi3",
        {},
        {
            "max_position_embeddings": 512,
            "original_max_position_embeddings": 64,
            "rope_scaling": _phi3_longrope(32, 64),
        },
        [1],
    ),
    "qwen3-untied-headdim64-1tile": ("qwen3", {}, {}, [1]),
    "qwen3-tied-bias-mqa-2images": (
        "qwen3",
        {},
        {"tie_word_embeddings": True, "qkv_bias": True, "o_bias": True, "num_key_value_heads": 1},
        [1, 2],
    ),
    "qwen3-yarn-beyond-original-context": (
        "qwen3",
        {},
        {
            "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
            "max_position_embeddings": 256,
        },  # the 280-token prompt runs past the original 64 positions
        [1],
    ),
    "llama-linear-rope-bias": (
        "llama",
        {},
        {
            "rope_scaling": {"rope_type": "linear", "factor": 4.0},
            "qkv_bias": True,
            "o_bias": True,
            "tie_word_embeddings": False,
        },
        [1],
    ),  # fmt: skip
}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_and_greedy_match_transformers(case, tokenizer, tmp_path):
    family, vision, llm, tiles = CASES[case]
    cfg = _config(tokenizer, family, vision, **llm)
    model = build_model(cfg, seed=list(CASES).index(case))
    _random_qk_norms(model)
    path = save_checkpoint(model, tokenizer, tmp_path / "hf", layout="hf")
    ours, _ = load_checkpoint(path)
    ref = _hf_model(path)

    gen = torch.Generator().manual_seed(1)
    ids = torch.tensor([_prompt_ids(tokenizer, tiles)])
    pixel_values = torch.randn(sum(tiles), 3, 448, 448, generator=gen)
    with torch.no_grad():
        a = ours(input_ids=ids, pixel_values=pixel_values).logits
        b = ref(input_ids=ids, pixel_values=pixel_values).logits
    assert a.shape == b.shape
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
    # the comparison is sensitive: a perturbed weight must show up
    with torch.no_grad():
        ours.language_model.model.layers[0].mlp.up_proj.weight.mul_(1.01)
        c = ours(input_ids=ids, pixel_values=pixel_values).logits
        ours.language_model.model.layers[0].mlp.up_proj.weight.div_(1.01)
    assert (c - b).abs().max() > 10 * ATOL

    # greedy generation: our static-cache loop vs transformers' generate
    new = 8
    with torch.no_grad():
        expected = ref.generate(
            input_ids=ids, pixel_values=pixel_values, max_new_tokens=new, do_sample=False, eos_token_id=None,
            pad_token_id=0,
        )[0, ids.shape[1]:]  # fmt: skip
        got = _greedy(ours, ids, pixel_values, new)
    assert got == expected.tolist()


def _random_qk_norms(model: InternVLChatModel) -> None:
    """Qwen3's q/k norms start at ones; random weights make a mix-up of q and k, or of the order of
    norm and RoPE, show in the logits."""
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.language_model.named_parameters():
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                p.copy_(1 + 0.5 * torch.randn(p.shape, generator=gen))


def _greedy(model: InternVLChatModel, ids: torch.Tensor, pixel_values, new: int) -> list[int]:
    cache = model.make_cache(1, ids.shape[1] + new)
    logits = model(input_ids=ids, pixel_values=pixel_values, kv_cache=cache, logits_to_keep=1).logits
    out = []
    for _ in range(new):
        tok = int(logits[0, -1].argmax())
        out.append(tok)
        logits = model(input_ids=torch.tensor([[tok]]), kv_cache=cache).logits
    return out


def test_left_padded_batch_matches_transformers(tokenizer, tmp_path):
    cfg = _config(tokenizer, "qwen2")
    path = save_checkpoint(build_model(cfg, seed=3), tokenizer, tmp_path / "hf", layout="hf")
    ours, _ = load_checkpoint(path)
    ref = _hf_model(path)
    rows = [
        _prompt_ids(tokenizer, [1], "a short one"),
        _prompt_ids(tokenizer, [1], "a much longer question " * 4),
    ]
    width = max(map(len, rows))
    pad = tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    pixel_values = torch.randn(2, 3, 448, 448, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a = ours(input_ids=ids, pixel_values=pixel_values, attention_mask=mask).logits
        b = ref(
            input_ids=ids, pixel_values=pixel_values, attention_mask=mask, position_ids=position_ids
        ).logits
    keep = mask.bool()
    torch.testing.assert_close(a[keep], b[keep], atol=ATOL, rtol=0)
    # and each row alone gives the same logits as inside the padded batch
    with torch.no_grad():
        single = ours(input_ids=torch.tensor([rows[0]]), pixel_values=pixel_values[:1]).logits[0]
    torch.testing.assert_close(a[0, width - len(rows[0]) :], single, atol=ATOL, rtol=0)


def test_phi3_longrope_matches_transformers_phi3(tokenizer, tmp_path):
    """Original-layout Phi-3 (fused qkv_proj / gate_up_proj) vs Phi3ForCausalLM, short and long rope."""
    from transformers import Phi3Config, Phi3ForCausalLM

    cfg = _config(tokenizer, "phi3", max_position_embeddings=512, original_max_position_embeddings=64)
    cfg.llm.rope_scaling = dict(cfg.llm.rope_scaling, original_max_position_embeddings=64)
    path = save_checkpoint(build_model(cfg, seed=4), tokenizer, tmp_path / "orig", layout="internvl_chat")
    ours, _ = load_checkpoint(path)
    disk, _ = read_weights(path)
    assert any(k.endswith("self_attn.qkv_proj.weight") for k in disk)
    assert any(k.endswith("mlp.gate_up_proj.weight") for k in disk)
    c = cfg.llm
    ref_cfg = Phi3Config(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, max_position_embeddings=c.max_position_embeddings,
        original_max_position_embeddings=64, rms_norm_eps=c.rms_norm_eps, tie_word_embeddings=False,
        rope_parameters={"rope_type": "longrope", "rope_theta": c.rope_theta, "short_factor": c.rope_scaling["short_factor"],
                         "long_factor": c.rope_scaling["long_factor"], "original_max_position_embeddings": 64},
        pad_token_id=0,
    )  # fmt: skip
    ref = Phi3ForCausalLM(ref_cfg).eval()
    llm_sd = {k[len("language_model.") :]: v for k, v in disk.items() if k.startswith("language_model.")}
    missing, unexpected = ref.load_state_dict(llm_sd, strict=False)
    assert not unexpected and not [m for m in missing if "rotary" not in m]
    gen = torch.Generator().manual_seed(5)
    for length in (40, 150):  # below / above original_max_position_embeddings: short / long factors
        ids = torch.randint(0, len(tokenizer), (2, length), generator=gen)
        with torch.no_grad():
            a = ours(input_ids=ids).logits
            b = ref(input_ids=ids).logits
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
    assert ours.language_model.model.rotary_emb.attention_factor > 1.0


@pytest.mark.parametrize(
    "rope", [None, {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 32}]
)
def test_qwen3_original_layout_matches_transformers_qwen3(tokenizer, tmp_path, rope):
    """InternVL3.5's original layout: ``llm_config`` as written is a valid ``Qwen3Config`` and
    ``Qwen3ForCausalLM`` on the ``language_model.`` tensors gives our text logits (random q/k norms),
    with plain RoPE and with Qwen3's long-context yarn (60 tokens, past the original 32)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = _config(tokenizer, "qwen3", rope_scaling=rope)
    model = build_model(cfg, seed=6)
    _random_qk_norms(model)
    path = save_checkpoint(model, tokenizer, tmp_path / "orig", layout="internvl_chat")
    raw = json.loads((path / "config.json").read_text())["llm_config"]
    assert raw["architectures"] == ["Qwen3ForCausalLM"] and raw["head_dim"] == 64
    ours, _ = load_checkpoint(path)
    disk, _ = read_weights(path)
    assert any(k.endswith("self_attn.q_norm.weight") for k in disk)
    ref = Qwen3ForCausalLM(Qwen3Config(**raw)).eval()
    llm_sd = {k[len("language_model.") :]: v for k, v in disk.items() if k.startswith("language_model.")}
    missing, unexpected = ref.load_state_dict(llm_sd, strict=False)
    assert not unexpected and not [m for m in missing if "rotary" not in m]
    ids = torch.randint(0, len(tokenizer), (2, 60), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, ref(input_ids=ids).logits, atol=ATOL, rtol=0)


def test_internlm2_wqkv_layout_matches_upstream_split(tokenizer, tmp_path):
    """Our fused ``wqkv`` follows the upstream grouped layout: rows (kv_head, n_q/n_kv + 2, head_dim)."""
    cfg = _config(tokenizer, "internlm2", num_attention_heads=8, num_key_value_heads=2)
    model = build_model(cfg, seed=6)
    path = save_checkpoint(model, tokenizer, tmp_path / "orig", layout="internvl_chat")
    disk, _ = read_weights(path)
    wqkv = disk["language_model.model.layers.0.attention.wqkv.weight"]
    assert "language_model.model.tok_embeddings.weight" in disk and "language_model.output.weight" in disk
    x = torch.randn(3, cfg.llm.hidden_size)
    n_kv, d, groups = 2, cfg.llm.head_dim, 8 // 2
    # upstream: "b q (h gs d) -> b q h gs d", q = [..., :groups, :], k = [..., -2, :], v = [..., -1, :]
    qkv = (x @ wqkv.T).reshape(3, n_kv, groups + 2, d)
    q_ref = qkv[:, :, :groups].reshape(3, n_kv * groups * d)
    k_ref, v_ref = qkv[:, :, -2].reshape(3, n_kv * d), qkv[:, :, -1].reshape(3, n_kv * d)
    attn = model.language_model.model.layers[0].self_attn
    with torch.no_grad():
        torch.testing.assert_close(attn.q_proj(x), q_ref)
        torch.testing.assert_close(attn.k_proj(x), k_ref)
        torch.testing.assert_close(attn.v_proj(x), v_ref)
    # and the original-layout checkpoint gives the same logits as the hf one (InternLM2 -> Llama)
    hf_path = save_checkpoint(model, tokenizer, tmp_path / "hf", layout="hf")
    a_model, _ = load_checkpoint(path)
    b_model, _ = load_checkpoint(hf_path)
    ids = torch.tensor([_prompt_ids(tokenizer, [1])])
    pv = torch.randn(1, 3, 448, 448)
    with torch.no_grad():
        torch.testing.assert_close(
            a_model(input_ids=ids, pixel_values=pv).logits,
            b_model(input_ids=ids, pixel_values=pv).logits,
            atol=0,
            rtol=0,
        )


def test_vision_tower_matches_transformers_at_other_sizes(tokenizer, tmp_path):
    """Position-embedding interpolation (bicubic) at non-448 inputs, whole ViT vs transformers."""
    cfg = _config(tokenizer, "qwen2")
    path = save_checkpoint(build_model(cfg, seed=7), tokenizer, tmp_path / "hf", layout="hf")
    ours, _ = load_checkpoint(path)
    ref = _hf_model(path)
    # make the position table non-trivial so interpolation matters
    with torch.no_grad():
        assert ours.vision_model.embeddings.position_embedding.abs().sum() > 0
    for size in (224, 336, 448):
        pv = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(size))
        with torch.no_grad():
            a = ours.vision_model(pv)
            b = ref.model.vision_tower(pixel_values=pv).last_hidden_state
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


def test_select_layer_matches_transformers_vision_feature_layer(tokenizer, tmp_path):
    cfg = _config(tokenizer, "qwen2", {"num_hidden_layers": 3})
    cfg.select_layer = -2
    path = save_checkpoint(build_model(cfg, seed=8), tokenizer, tmp_path / "hf", layout="hf")
    ours, _ = load_checkpoint(path)
    assert ours.config.select_layer == -2
    ref = _hf_model(path)
    ids = torch.tensor([_prompt_ids(tokenizer, [1])])
    pv = torch.randn(1, 3, 448, 448, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        a = ours(input_ids=ids, pixel_values=pv).logits
        b = ref(input_ids=ids, pixel_values=pv).logits
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
        ours.config.select_layer = -1  # the last layer gives different features
        assert (ours(input_ids=ids, pixel_values=pv).logits - b).abs().max() > 10 * ATOL
