"""Mono-InternVL model: gathered modality routing vs upstream's dense formula, attention experts, the
patch-embedding vision path, and generation end to end with the runtime's engine and ChatModel."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from interleaf.errors import InputError
from interleaf.model import InternVLChatModel, mono_internvl
from interleaf.model.intern_vit import pixel_shuffle
from interleaf.model.llm import apply_rope
from interleaf.model.mono_checkpoint import (
    build_mono_model,
    init_mono_model,
    load_mono_chat,
    mono_preset_config,
)
from interleaf.model.mono_internvl import (
    MonoAttention,
    MonoDecoderLayer,
    MonoInternVLChatModel,
    modality_route,
)

CTX = 500  # <IMG_CONTEXT> id for the tokenizer-free models below
TOKENS = 256  # per 448 px tile


def _model(attention_experts: bool = False, seed: int = 0) -> MonoInternVLChatModel:
    cfg = mono_preset_config("tiny-mono", vocab_size=512, visual_attention_experts=attention_experts)
    cfg.img_context_token_id = CTX
    # independent random experts (not copies of the text FFN), so a wrong route changes numbers
    return build_mono_model(cfg, seed=seed, copy_experts=False)


def _prompt(n_tiles: int, batch: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    text = 12
    ids = torch.randint(10, 400, (batch, text + n_tiles * TOKENS + 8), generator=g)
    ids[:, text : text + n_tiles * TOKENS] = CTX
    px = torch.randn(batch * n_tiles, 3, 448, 448, generator=g)
    return ids, px


class _RowCounter:
    """Counts the rows (tokens) each hooked Linear sees."""

    def __init__(self, modules: dict[str, torch.nn.Module]) -> None:
        self.rows = dict.fromkeys(modules, 0)
        self.handles = [m.register_forward_hook(self._hook(name)) for name, m in modules.items()]

    def _hook(self, name: str):
        def hook(module, args, out):
            self.rows[name] += args[0].reshape(-1, args[0].shape[-1]).shape[0]

        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def test_gathered_routing_equals_dense_formula_and_runs_each_expert_on_its_tokens():
    model = _model()
    layer = model.language_model.model.layers[0]
    assert isinstance(layer, MonoDecoderLayer)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 50, model.config.llm.hidden_size, generator=g)
    mask = torch.rand(3, 50, generator=g) < 0.4
    counter = _RowCounter({"text": layer.mlp.gate_proj, "visual": layer.feed_forward_ve.w1})
    with torch.no_grad():
        got = layer.feed_forward(x, mask)
    assert mask._interleaf_route.segments is None  # a random mask has many runs: gather / scatter
    counter.close()
    assert counter.rows == {"text": int((~mask).sum()), "visual": int(mask.sum())}  # no token runs twice
    with torch.no_grad():
        ref = (
            layer.mlp(x) * (1 - mask[..., None].float()) + layer.feed_forward_ve(x) * mask[..., None].float()
        )
        assert torch.allclose(got, ref, atol=1e-6, rtol=1e-5)
        assert torch.allclose(got, layer.dense_feed_forward(x, mask), atol=1e-6, rtol=1e-5)
        # the experts really differ, so the test can tell a wrong route
        assert (layer.mlp(x) - layer.feed_forward_ve(x)).abs().max() > 1e-3
        # degenerate masks: all text is bit-identical to the text FFN; all visual to the expert
        assert torch.equal(layer.feed_forward(x, torch.zeros_like(mask)), layer.mlp(x))
        assert torch.allclose(
            layer.feed_forward(x, torch.ones_like(mask)), layer.feed_forward_ve(x), atol=1e-6
        )


def test_whole_model_matches_dense_reference_and_upstream_float_mask():
    model = _model()
    ids, px = _prompt(n_tiles=1)
    with torch.no_grad():
        got = model(input_ids=ids, pixel_values=px).logits
        float_mask = (ids == CTX).float()[..., None]  # upstream passes [B, S, 1] floats
        assert torch.equal(model(input_ids=ids, pixel_values=px, visual_mask=float_mask).logits, got)
        for layer in model.language_model.model.layers:
            layer.feed_forward = layer.dense_feed_forward
        ref = model(input_ids=ids, pixel_values=px).logits
    assert torch.allclose(got, ref, atol=1e-4, rtol=1e-4)


def test_text_only_input_is_exactly_the_plain_llm():
    model = _model()
    plain = InternVLChatModel(model.config)
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    assert all(k.startswith("vision_model.") for k in missing)
    assert unexpected and all(".feed_forward_ve." in k for k in unexpected)
    ids = torch.randint(10, 400, (2, 40))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, plain.language_model(input_ids=ids).logits)


def test_patch_embedding_vision_path():
    model = _model()
    _, px = _prompt(n_tiles=1, batch=2)
    emb = model.vision_model(px)
    c = model.config.vision.hidden_size
    assert emb.shape == (2, 1 + 32 * 32, c)  # CLS + 1024 patches
    assert not hasattr(model.vision_model, "encoder")  # no transformer blocks
    with torch.no_grad():
        feats = model.extract_feature(px)
        grid = emb[:, 1:].reshape(2, 32, 32, c)  # CLS dropped
        ref = model.mlp1(pixel_shuffle(grid, 0.5, "v2").reshape(2, TOKENS, 4 * c))
    assert feats.shape == (2, TOKENS, model.config.llm.hidden_size)
    assert torch.equal(feats, ref)
    assert model.config.num_image_token == TOKENS


def _dense_attention(attn: MonoAttention, x, m, cos, sin):
    """Reference: every projection run on every token, mixed by the mask (upstream style)."""
    mm = m[..., None].float()

    def mix(text, visual, inp):
        return text(inp) * (1 - mm) + visual(inp) * mm

    b, s, _ = x.shape
    d = attn.head_dim
    q = mix(attn.q_proj, attn.q_proj_ve, x).view(b, s, -1, d).transpose(1, 2)
    k = mix(attn.k_proj, attn.k_proj_ve, x).view(b, s, -1, d).transpose(1, 2)
    v = mix(attn.v_proj, attn.v_proj_ve, x).view(b, s, -1, d).transpose(1, 2)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    out = out.transpose(1, 2).reshape(b, s, -1)
    return mix(attn.o_proj, attn.o_proj_ve, out)


def test_visual_attention_experts_match_dense_reference():
    model = _model(attention_experts=True)
    lm = model.language_model
    attn = lm.model.layers[0].self_attn
    assert isinstance(attn, MonoAttention)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 30, model.config.llm.hidden_size, generator=g)
    mask = torch.rand(2, 30, generator=g) < 0.5
    pos = torch.arange(30)[None].expand(2, 30)
    cos, sin = lm.model.rotary_emb(pos)
    cos, sin = cos[:, None], sin[:, None]
    with torch.no_grad():
        got = attn(x, cos, sin, None, True, None, torch.arange(30), 30, mask)
        ref = _dense_attention(attn, x, mask, cos, sin)
        text_only = attn(x, cos, sin, None, True, None, torch.arange(30), 30, torch.zeros_like(mask))
        plain = super(MonoAttention, attn).forward(x, cos, sin, None, True, None, torch.arange(30), 30)
    assert torch.allclose(got, ref, atol=1e-5, rtol=1e-4)
    assert torch.equal(text_only, plain)
    # and the whole model still equals its text path on text-only input, and runs with images
    ids, px = _prompt(n_tiles=1, batch=1)
    with torch.no_grad():
        assert model(input_ids=ids, pixel_values=px).logits.isfinite().all()


# image-token layouts per batch row: (start, number of 256-token tiles) runs in a 600-token row
LAYOUTS = {
    "one image": [[(12, 1)]],
    "two images split by text": [[(5, 1), (300, 1)]],
    "image at start and at end": [[(0, 1), (600 - TOKENS, 1)]],
    "only image tokens": [[(0, 2)]],
    "batch of 2, different layouts": [[(20, 2)], [(0, 1), (330, 1)]],
    "batch of 2, runs across rows": [[(600 - TOKENS, 1)], [(0, 1), (300, 1)]],
}


def _layout_ids(rows: list[list[tuple[int, int]]], length: int = 600, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    length = max(length, max(start + n * TOKENS for row in rows for start, n in row))
    ids = torch.randint(10, 400, (len(rows), length), generator=g)
    for r, row in enumerate(rows):
        for start, n in row:
            ids[r, start : start + n * TOKENS] = CTX
    n_tiles = int((ids == CTX).sum()) // TOKENS
    return ids, torch.randn(n_tiles, 3, 448, 448, generator=g)


def _rope(model, x):
    b, s, _ = x.shape
    cos, sin = model.language_model.model.rotary_emb(torch.arange(s)[None].expand(b, s))
    return cos[:, None], sin[:, None]


def _forward_layer(model, layer, x, mask):
    """One decoder layer (attention + FFN) over x [B, S, H], causal, no cache."""
    s = x.shape[1]
    return layer(x, *_rope(model, x), None, True, None, torch.arange(s), s, mask)


@pytest.mark.parametrize("attention_experts", [False, True], ids=["ffn-experts", "attn-experts"])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_segment_routing_equals_gather_routing_and_dense_formula(layout, attention_experts, monkeypatch):
    """Real prompts hold images as contiguous runs: the experts then run on slices (views) of the
    hidden states. Same numbers as gathering (bit for bit) and as upstream's dense formula."""
    model = _model(attention_experts=attention_experts).eval()
    lm = model.language_model
    ids, px = _layout_ids(LAYOUTS[layout])
    mask = ids == CTX
    route = modality_route(mask.clone())
    assert route.segments is not None and route.num_visual == int(mask.sum())
    assert [(a, b) for a, b, v in route.segments if v] == _runs(mask.reshape(-1))
    layer = lm.model.layers[0]
    x = torch.randn(*ids.shape, model.config.llm.hidden_size, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        seg_ffn, seg_layer = (
            layer.feed_forward(x, mask.clone()),
            _forward_layer(model, layer, x, mask.clone()),
        )
        seg_logits = model(input_ids=ids, pixel_values=px).logits
        embeds = model.embed(ids, px)  # the model core's masked_scatter
        monkeypatch.setattr(mono_internvl, "MAX_SEGMENT_RUNS", 0)  # force gather / scatter
        gathered = mask.clone()
        gat_ffn, gat_layer = layer.feed_forward(x, gathered), _forward_layer(model, layer, x, gathered)
        assert gathered._interleaf_route.segments is None
        gat_logits = model(input_ids=ids, pixel_values=px).logits
        # dense references: FFN and, with attention experts, every projection on every token
        dense_ffn = layer.dense_feed_forward(x, mask)
        h = x
        if attention_experts:
            cos, sin = _rope(model, x)
            h = x + _dense_attention(layer.self_attn, layer.input_layernorm(x), mask, cos, sin)
        else:
            h = x + layer.self_attn(
                layer.input_layernorm(x), *_rope(model, x), None, True, None, None, x.shape[1]
            )
        dense_layer = h + layer.dense_feed_forward(layer.post_attention_layernorm(h), mask)
    assert torch.equal(seg_ffn, gat_ffn) and torch.equal(seg_layer, gat_layer)
    assert torch.equal(seg_logits, gat_logits)
    assert torch.allclose(seg_ffn, dense_ffn, atol=1e-6, rtol=1e-5)
    assert torch.allclose(seg_layer, dense_layer, atol=1e-5, rtol=1e-4)
    # the slice-filled input embeddings are exactly the model core's
    with torch.no_grad():
        monkeypatch.setattr(mono_internvl, "MAX_SEGMENT_RUNS", 8)
        seg_route = modality_route(mask.clone())
        assert torch.equal(model._embed_runs(ids, seg_route, px, None), embeds)
    if not attention_experts:  # whole model against the dense FFN formula
        with torch.no_grad():
            for layer in lm.model.layers:
                layer.feed_forward = layer.dense_feed_forward
            ref = model(input_ids=ids, pixel_values=px).logits
        assert torch.allclose(seg_logits, ref, atol=1e-4, rtol=1e-4)


def _runs(flat: torch.Tensor) -> list[tuple[int, int]]:
    """Reference run finder, one token at a time."""
    runs, start = [], None
    for i, v in enumerate(flat.tolist() + [False]):
        if v and start is None:
            start = i
        elif not v and start is not None:
            runs.append((start, i))
            start = None
    return runs


def test_single_image_reaches_its_expert_without_a_copy_and_many_runs_fall_back_to_gather():
    model = _model()
    layer = model.language_model.model.layers[0]
    seen = []
    handle = layer.feed_forward_ve.w1.register_forward_hook(lambda m, a, o: seen.append(a[0]))
    x = torch.randn(2, 600, model.config.llm.hidden_size)
    one = torch.zeros(2, 600, dtype=torch.bool)
    one[1, 100 : 100 + TOKENS] = True
    # nine images, each between text tokens: more runs than MAX_SEGMENT_RUNS
    many = torch.zeros(1, 9 * (TOKENS + 3), dtype=torch.bool)
    for i in range(9):
        many[0, i * (TOKENS + 3) + 2 : (i + 1) * (TOKENS + 3) - 1] = True
    assert len(_runs(many.reshape(-1))) == 9 > mono_internvl.MAX_SEGMENT_RUNS
    xm = torch.randn(1, many.shape[1], model.config.llm.hidden_size)
    with torch.no_grad():
        layer.feed_forward(x, one.clone())
        view = seen.pop()
        assert view._is_view() and view.data_ptr() == x[1, 100].data_ptr()  # the hidden states themselves
        m = many.clone()
        got = layer.feed_forward(xm, m)
        assert m._interleaf_route.segments is None and not seen.pop()._is_view()
        assert torch.allclose(got, layer.dense_feed_forward(xm, many), atol=1e-6, rtol=1e-5)
        as_segments = modality_route(many.clone(), max_runs=9)
        assert as_segments.segments is not None
        assert torch.equal(mono_internvl.routed(xm, as_segments, layer.mlp, layer.feed_forward_ve), got)
        # and through the whole model (9 images -> 9 tiles): fallback equals the segment route
        ids = torch.randint(10, 400, many.shape)
        ids[many] = CTX
        px = torch.randn(9, 3, 448, 448)
        fallback = model(input_ids=ids, pixel_values=px).logits
    handle.remove()
    with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(mono_internvl, "MAX_SEGMENT_RUNS", 9)
        assert torch.equal(model(input_ids=ids, pixel_values=px).logits, fallback)
    # a wrong number of image tokens is still the model's one-line error
    with pytest.raises(InputError, match="IMG_CONTEXT"):
        model(input_ids=ids[:, : 3 * TOKENS], pixel_values=px)


@pytest.fixture(scope="module", params=[False, True], ids=["ffn-experts", "attn-experts"])
def mono_ckpt(tmp_path_factory, request):
    out = tmp_path_factory.mktemp("mono") / "tiny-mono"
    return init_mono_model("tiny-mono", out, seed=3, visual_attention_experts=request.param)


def test_generation_end_to_end_with_runtime_engine(mono_ckpt):
    from PIL import Image, ImageDraw

    from interleaf.generation.engine import GenerationConfig, Generator

    chat = load_mono_chat(mono_ckpt)  # the runtime's ChatModel on the Mono model
    model = chat.model
    img = Image.new("RGB", (600, 300), "white")
    ImageDraw.Draw(img).ellipse((100, 50, 300, 250), fill="red")
    reply = chat.chat("What is in the image?", images=img, max_num=1, max_new_tokens=4)
    assert isinstance(reply, str)

    _, ids, px, _ = chat.prepare("Describe it.", images=img, max_num=2)
    ids = torch.tensor([ids])
    assert int((ids == model.config.img_context_token_id).sum()) == px.shape[0] * TOKENS  # 256 per tile
    assert px.shape[0] == 3  # 2 tiles + thumbnail, as InternVL tiles it
    cfg = GenerationConfig(max_new_tokens=6, ignore_eos=True)
    layer0 = model.language_model.model.layers[0]
    hooked = {"visual": layer0.feed_forward_ve.w1, "text": layer0.mlp.gate_proj}
    if model.config.visual_attention_experts:
        hooked.update(visual_attn=layer0.self_attn.q_proj_ve, text_attn=layer0.self_attn.q_proj)
    counter = _RowCounter(hooked)
    out = Generator(model).generate(ids, pixel_values=px, config=cfg)
    counter.close()
    n_img = px.shape[0] * TOKENS
    # prefill: image tokens once through the expert; the 5 decode steps only through the text FFN
    # (and, with attention experts, the text attention projections)
    assert counter.rows["visual"] == n_img
    assert counter.rows["text"] == ids.shape[1] - n_img + 5
    if model.config.visual_attention_experts:
        assert counter.rows["visual_attn"] == n_img
        assert counter.rows["text_attn"] == ids.shape[1] - n_img + 5

    # greedy tokens equal a cache-free loop that recomputes the whole sequence each step
    seq = ids
    with torch.no_grad():
        image_embeds = model.extract_feature(px)
        for _ in range(6):
            logits = model(input_ids=seq, image_embeds=image_embeds).logits[:, -1]
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
    assert out.tokens[0] == seq[0, ids.shape[1] :].tolist()


def test_ttft_benchmark_script_runs(tmp_path, monkeypatch):
    """The benchmark stays runnable (tiny shape, one tile, one run)."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_mono_ttft.py"
    monkeypatch.syspath_prepend(str(path.parent))  # as when run as a script: its folder's modules import
    spec = importlib.util.spec_from_file_location("bench_mono_ttft", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "ttft.json"
    assert (
        bench.main(
            ["--shape", "tiny", "--tiles", "1", "--quick", "--dtype", "fp32", "--json", str(out)]
            + ["--compare-gather", "--compare-dense"]
        )
        == 0
    )
    row = json.loads(out.read_text())["rows"][0]
    assert row["mono_gather_ttft_s"] > 0 and row["mono_dense_ttft_s"] > 0
    assert row["tiles"] == 1 and row["tokens"] > TOKENS
    assert row["internvl_ttft_s"] > 0 and row["mono_ttft_s"] > 0
