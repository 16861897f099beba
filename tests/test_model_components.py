"""Model parts: pixel shuffle, position-embedding interpolation, KV cache, masks, visual_mask routing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from interleaf.errors import InputError
from interleaf.model import DecoderLayer, InternVLChatModel, build_model, load_checkpoint, preset_config
from interleaf.model.intern_vit import pixel_shuffle


def _upstream_pixel_shuffle(x, scale_factor=0.5, ps_version="v2"):
    """Direct re-statement of the upstream op order (spec 1.2) on x[n, w, h, c]."""
    n, w, h, c = x.size()
    x = x.view(n, w, int(h * scale_factor), int(c / scale_factor))
    x = x.permute(0, 2, 1, 3).contiguous()
    x = x.view(n, int(h * scale_factor), int(w * scale_factor), int(c / (scale_factor * scale_factor)))
    if ps_version != "v1":
        x = x.permute(0, 2, 1, 3).contiguous()
    return x


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_pixel_shuffle_matches_upstream_op_order(version):
    x = torch.randn(2, 6, 6, 5)
    torch.testing.assert_close(
        pixel_shuffle(x, 0.5, version), _upstream_pixel_shuffle(x, 0.5, version), rtol=0, atol=0
    )


def test_pixel_shuffle_token_layout():
    """v2 token (k, j) = concat(x[2k,2j], x[2k,2j+1], x[2k+1,2j], x[2k+1,2j+1]); v1 is its transpose."""
    c = 3
    x = torch.arange(4 * 4 * c, dtype=torch.float32).reshape(1, 4, 4, c)
    v2 = pixel_shuffle(x, 0.5, "v2")
    v1 = pixel_shuffle(x, 0.5, "v1")
    for k in range(2):
        for j in range(2):
            want = torch.cat(
                [
                    x[0, 2 * k, 2 * j],
                    x[0, 2 * k, 2 * j + 1],
                    x[0, 2 * k + 1, 2 * j],
                    x[0, 2 * k + 1, 2 * j + 1],
                ]
            )
            assert torch.equal(v2[0, k, j], want)
            assert torch.equal(v1[0, j, k], want)


def test_position_embedding_interpolation_in_fp32():
    cfg = preset_config("tiny", vocab_size=128)
    model = build_model(cfg, seed=0, dtype=torch.bfloat16)
    emb = model.vision_model.embeddings
    table = emb.position_embedding[:, 1:].float().reshape(1, 32, 32, -1).permute(0, 3, 1, 2)
    want = F.interpolate(table, size=(24, 24), mode="bicubic", align_corners=False)
    want = want.reshape(1, table.shape[1], -1).permute(0, 2, 1).to(torch.bfloat16)
    got = emb.patch_pos_embed(24, 24, torch.bfloat16)
    assert got.shape == (1, 24 * 24, cfg.vision.hidden_size)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # identity at the trained grid
    assert torch.equal(emb.patch_pos_embed(32, 32, torch.bfloat16), emb.position_embedding[:, 1:])
    out = model.extract_feature(torch.randn(1, 3, 336, 336, dtype=torch.bfloat16))
    assert out.shape == (1, 144, cfg.llm.hidden_size)


@pytest.fixture(scope="module")
def tiny(tiny_ckpt):
    return load_checkpoint(tiny_ckpt)


def _ids(tok, n_tiles=1, text="what is shown here"):
    return tok("<img>" + "<IMG_CONTEXT>" * 256 * n_tiles + "</img>\n" + text, return_tensors="pt").input_ids


def test_kv_cache_prefill_decode_equals_full_forward(tiny):
    model, tok = tiny
    ids = _ids(tok)
    pv = torch.randn(1, 3, 448, 448, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(input_ids=ids, pixel_values=pv).logits
        n = ids.shape[1]
        # prefill all but the last 6 tokens (in two chunks), then decode one by one
        cache = model.make_cache(1, n + 4)
        embeds = model.embed(ids, pv)
        a = model(inputs_embeds=embeds[:, : n - 20], kv_cache=cache).logits
        b = model(inputs_embeds=embeds[:, n - 20 : n - 6], kv_cache=cache).logits
        steps = [model(input_ids=ids[:, i : i + 1], kv_cache=cache).logits for i in range(n - 6, n)]
        inc = torch.cat([a, b, *steps], dim=1)
        torch.testing.assert_close(inc, full, atol=1e-5, rtol=0)
        # explicit cache_position, whole-buffer attention (the CUDA-graph path)
        cache2 = model.make_cache(1, n + 10)
        cache2.full_attention = True
        pos = torch.arange(n - 1)
        model(inputs_embeds=embeds[:, : n - 1], kv_cache=cache2, cache_position=pos)
        last = model(
            input_ids=ids[:, -1:], kv_cache=cache2, cache_position=torch.tensor([n - 1]), logits_to_keep=1
        ).logits
        torch.testing.assert_close(last[0, -1], full[0, -1], atol=1e-5, rtol=0)


def test_left_padded_generation_with_cache(tiny):
    model, tok = tiny
    rows = [tok("hello there").input_ids, tok("a longer prompt about the picture on the wall").input_ids]
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    with torch.no_grad():
        cache = model.make_cache(2, width + 3)
        out = model(input_ids=ids, attention_mask=mask, kv_cache=cache, logits_to_keep=1).logits
        nxt = out[:, -1].argmax(-1, keepdim=True)
        mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
        step = model(input_ids=nxt, attention_mask=mask, kv_cache=cache).logits[:, -1]
        for r, row in enumerate(rows):
            alone = model(input_ids=torch.tensor([row + [int(nxt[r])]])).logits[0, -1]
            torch.testing.assert_close(step[r], alone, atol=1e-5, rtol=0)
        assert torch.isfinite(out).all()


def test_packed_4d_mask_equals_separate_sequences(tiny):
    model, tok = tiny
    a, b = tok("first packed sample").input_ids, tok("second sample, a bit longer than that").input_ids
    ids = torch.tensor([a + b])
    n = len(a) + len(b)
    seg = torch.tensor([0] * len(a) + [1] * len(b))
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    mask = (causal & (seg[:, None] == seg[None, :]))[None, None]
    pos = torch.tensor([list(range(len(a))) + list(range(len(b)))])
    with torch.no_grad():
        packed = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[0]
        sa = model(input_ids=torch.tensor([a])).logits[0]
        sb = model(input_ids=torch.tensor([b])).logits[0]
    torch.testing.assert_close(packed, torch.cat([sa, sb]), atol=1e-5, rtol=0)


def test_logits_to_keep_and_hidden_states(tiny):
    model, tok = tiny
    ids = tok("some text to check", return_tensors="pt").input_ids
    with torch.no_grad():
        full = model(input_ids=ids, output_hidden_states=True)
        last = model(input_ids=ids, logits_to_keep=1).logits
    assert last.shape == (1, 1, model.config.llm.vocab_size)
    torch.testing.assert_close(last[0, 0], full.logits[0, -1])
    assert len(full.hidden_states) == model.config.llm.num_hidden_layers + 1
    assert full["logits"] is full.logits


def test_image_token_count_mismatch_is_input_error(tiny):
    model, tok = tiny
    ids = _ids(tok, n_tiles=1)
    calls = []
    real = model.extract_feature
    model.extract_feature = lambda px: calls.append(px) or real(px)
    ctx = model.config.img_context_token_id
    try:
        message = rf"256 <IMG_CONTEXT> tokens \(image token id {ctx}\) but 512 image embeddings"
        with pytest.raises(InputError, match=message):
            model(input_ids=ids, pixel_values=torch.randn(2, 3, 448, 448))
        assert not calls  # refused before the vision pass (whose count sync would wait for it)
        with pytest.raises(InputError, match=message):
            model(input_ids=ids, image_embeds=torch.randn(2, 256, model.config.llm.hidden_size))
    finally:
        del model.extract_feature


def test_visual_mask_reaches_every_layer_feed_forward(tiny_ckpt):
    """A Mono-InternVL-style subclass overriding feed_forward sees the image-context mask."""
    seen = []

    class RecordingLayer(DecoderLayer):
        def feed_forward(self, x, visual_mask):
            seen.append(visual_mask.clone())
            return super().feed_forward(x, visual_mask)

    class Recording(InternVLChatModel):
        def __init__(self, config):
            super().__init__(config, layer_cls=RecordingLayer)

    model, tok = load_checkpoint(tiny_ckpt, model_cls=Recording)
    ids = _ids(tok)
    with torch.no_grad():
        model(input_ids=ids, pixel_values=torch.randn(1, 3, 448, 448))
    assert len(seen) == model.config.llm.num_hidden_layers
    want = ids == model.config.img_context_token_id
    assert all(torch.equal(m, want) for m in seen) and int(want.sum()) == 256


def test_bf16_forward_is_finite(tiny_ckpt):
    model, tok = load_checkpoint(tiny_ckpt, dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    ids = _ids(tok)
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=torch.randn(1, 3, 448, 448)).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_ps_version_v1_transposes_the_token_grid(tiny):
    model, _ = tiny
    pv = torch.randn(1, 3, 448, 448, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        v2 = model.extract_feature(pv)
        model.config.ps_version = "v1"
        try:
            v1 = model.extract_feature(pv)
        finally:
            model.config.ps_version = "v2"
    side = 16
    grid2 = v2.reshape(side, side, -1)
    torch.testing.assert_close(v1.reshape(side, side, -1), grid2.transpose(0, 1), rtol=0, atol=0)
    assert not torch.equal(v1, v2)


# ----------------------------------------------------------------------------- tokenizer formats
def _save_as_vocab_merges(tok, folder, tokenizer_class="Qwen2Tokenizer"):
    """Store ``tok`` the way the Qwen2-based InternVL checkpoints do: vocab.json + merges.txt +
    added_tokens.json + tokenizer_config.json, and no tokenizer.json."""
    import json

    folder.mkdir(parents=True, exist_ok=True)
    tok.backend_tokenizer.model.save(str(folder))
    added = {i: t for i, t in tok.added_tokens_decoder.items()}
    (folder / "added_tokens.json").write_text(json.dumps({t.content: i for i, t in added.items()}))
    entry = {"lstrip": False, "rstrip": False, "normalized": False, "single_word": False, "special": True}
    config = {
        "tokenizer_class": tokenizer_class,
        "added_tokens_decoder": {str(i): dict(entry, content=t.content) for i, t in added.items()},
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "clean_up_tokenization_spaces": False,
        "model_max_length": 32768,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def test_vocab_merges_tokenizer_loads_like_transformers(tiny_ckpt, tmp_path):
    """InternVL2-1B / 2.5-1B/4B ship vocab.json + merges.txt without tokenizer.json."""
    from transformers import AutoTokenizer

    from interleaf.model import load_tokenizer
    from interleaf.model.tokenizer import INTERNVL_TOKENS
    from interleaf.processing.prompt import build_prompt
    from interleaf.processing.templates import get_template

    _, tok = load_checkpoint(tiny_ckpt)
    folder = _save_as_vocab_merges(tok, tmp_path / "tok")
    assert not (folder / "tokenizer.json").exists()
    ours = load_tokenizer(folder, "Hermes-2")
    ref = AutoTokenizer.from_pretrained(str(folder))  # the reference: transformers' own reading
    assert ours.get_vocab() == ref.get_vocab() and len(ours) == len(ref)
    texts = [
        "Hello world, the cat sat on 12345 mats!",
        "  leading spaces\tand tabs\n\nnew lines",
        "你好，世界 — ünïcödé ✓",
        "<img><IMG_CONTEXT><IMG_CONTEXT></img>\nWhat is <ref>this</ref><box>[[1, 2, 3, 4]]</box>?",
    ]
    for template in ("Hermes-2", "internvl2_5"):
        texts.append(build_prompt(get_template(template), "Describe it.", num_tiles=[2], num_image_token=3))
    for text in texts:
        assert ours(text).input_ids == ref(text).input_ids, text
        assert ours.decode(ours(text).input_ids) == ref.decode(ref(text).input_ids)
    ids = ref.convert_tokens_to_ids(INTERNVL_TOKENS)
    assert ours.convert_tokens_to_ids(INTERNVL_TOKENS) == ids == list(range(ids[0], ids[0] + 9))
    assert ours.convert_tokens_to_ids("<|im_end|>") == ref.convert_tokens_to_ids("<|im_end|>")
    assert "<|im_end|>" in ours.all_special_tokens and ours.eos_token == "<|im_end|>"


def test_vocab_merges_checkpoint_chats(tiny_ckpt, tmp_path):
    """A whole checkpoint whose tokenizer is stored as vocab.json + merges.txt loads and runs."""
    import shutil

    import interleaf

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, ckpt)
    _, tok = load_checkpoint(tiny_ckpt)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (ckpt / name).unlink(missing_ok=True)
    _save_as_vocab_merges(tok, ckpt)
    chat = interleaf.load(ckpt)
    assert chat.model.config.img_context_token_id == tok.convert_tokens_to_ids("<IMG_CONTEXT>")
    assert isinstance(chat.chat("hello", max_new_tokens=3), str)


@pytest.mark.parametrize(
    "tokenizer_class, message",
    [(None, "field 'tokenizer_class'"), ("InternLM2Tokenizer", "not a transformers tokenizer")],
)
def test_vocab_merges_tokenizer_needs_a_transformers_class(tiny_ckpt, tmp_path, tokenizer_class, message):
    from interleaf.errors import CheckpointError
    from interleaf.model import load_tokenizer

    _, tok = load_checkpoint(tiny_ckpt)
    folder = _save_as_vocab_merges(tok, tmp_path / "tok", tokenizer_class)
    with pytest.raises(CheckpointError, match=message) as info:
        load_tokenizer(folder)
    assert "tokenizer_config.json" in str(info.value) and "\n" not in str(info.value)


# ----------------------------------------------------------------------------- stochastic depth
def test_drop_path_is_identity_in_eval_and_keeps_weight_names():
    cfg = preset_config("tiny", vocab_size=128)
    plain = build_model(cfg, seed=0)
    cfg.vision.drop_path_rate = 0.1  # what the upstream fine-tune scripts set
    dropped = build_model(cfg, seed=0)
    assert list(plain.state_dict()) == list(dropped.state_dict())
    layers = dropped.vision_model.encoder.layers
    want = torch.linspace(0, 0.1, len(layers)).tolist()  # upstream ``dpr``: 0 at the first block
    assert [b.drop_path1.p for b in layers] == [b.drop_path2.p for b in layers] == want
    px = torch.randn(3, 3, 448, 448)
    plain.eval(), dropped.eval()
    with torch.no_grad():
        assert torch.equal(plain.vision_model(px), dropped.vision_model(px))
        dropped.train()
        assert not torch.equal(plain.vision_model(px), dropped.vision_model(px))
        plain.train()  # rate 0: training mode changes nothing either
        assert torch.equal(plain.vision_model(px), dropped.eval().vision_model(px))


def test_drop_path_drops_whole_samples_at_its_rate():
    from interleaf.model.intern_vit import DropPath

    torch.manual_seed(0)
    drop = DropPath(0.3).train()
    x = torch.ones(20000, 5, 4)
    y = drop(x)
    kept = y[:, 0, 0] != 0
    assert abs(1 - kept.float().mean().item() - 0.3) < 0.015  # per-sample drop rate
    assert torch.equal(y[kept], torch.full_like(y[kept], 1 / 0.7))  # survivors rescaled, whole samples
    assert torch.equal(y[~kept], torch.zeros_like(y[~kept]))
    assert abs(y.mean().item() - 1.0) < 0.03  # unbiased in expectation
    assert torch.equal(drop.eval()(x), x) and torch.equal(DropPath(0.0).train()(x), x)


def test_drop_path_in_a_training_step_of_the_vision_tower():
    """A block whose residual branches are dropped passes its input through unchanged."""
    from interleaf.model.intern_vit import VisionBlock

    cfg = preset_config("tiny", vocab_size=128).vision
    block = VisionBlock(cfg, drop_path_rate=0.5).train()
    x = torch.randn(64, 10, cfg.hidden_size)
    torch.manual_seed(1)
    y = block(x)
    same = (y == x).flatten(1).all(1)  # both branches dropped for these tiles: p = 0.25
    assert 0.05 < same.float().mean().item() < 0.5
    with torch.no_grad():
        assert not (block.eval()(x) == x).flatten(1).all(1).any()  # in eval no branch is dropped


def test_set_drop_path_rate_on_a_loaded_model(tiny_ckpt):
    model, _ = load_checkpoint(tiny_ckpt)
    vit = model.vision_model
    vit.set_drop_path_rate(0.1)
    n = len(vit.encoder.layers)
    assert [b.drop_path2.p for b in vit.encoder.layers] == torch.linspace(0, 0.1, n).tolist()
    assert model.config.vision.drop_path_rate == 0.1
    with pytest.raises(ValueError, match="drop_path_rate must be a number in"):
        vit.set_drop_path_rate(1.0)
