"""LCL (interleaf.model.lcl): the OpenCLIP towers against transformers' CLIP models with the weights
renamed, and the attentive pooling, the interleaving, the contrastive pairs, the generation targets and
the loss against straightforward loops written here; checkpoints (ours and the official OpenCLIP
layout); gradients into the ViT; the two-process contrastive loss with ranks holding different numbers
of images."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from datetime import timedelta

import pytest
import torch
import torch.nn.functional as F

from interleaf.errors import CheckpointError
from interleaf.model.lcl import (
    LCL_PRESETS,
    LCLConfig,
    LCLModel,
    LCLOutput,
    lcl_loss,
    load_lcl,
    save_lcl,
)

VOCAB = 300
SOT, EOT, IMG, SOI, EOI = 295, 296, 297, 298, 299
SPECIAL = {
    "<start_of_text>": SOT,
    "<end_of_text>": EOT,
    "<img_placehold>": IMG,
    "<start_of_img>": SOI,
    "<end_of_img>": EOI,
}
TINY = LCL_PRESETS["tiny"]
P = (TINY["image_size"] // TINY["patch_size"]) ** 2  # image tokens per image (16)


def _config() -> LCLConfig:
    return LCLConfig(**TINY, vocab_size=VOCAB, special_token_ids=dict(SPECIAL))


def _model(seed: int = 0) -> LCLModel:
    """Random weights; the 1-d parameters (LayerNorm affines, biases, the pooler's q/k/v biases,
    zero or one at init) are perturbed too, so a swapped or dropped one changes the numbers."""
    torch.manual_seed(seed)
    model = LCLModel(_config()).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


def _image() -> list[int]:
    return [SOI] + [IMG] * P + [EOI]


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Three rows, five images: row 0 starts with an image (no context: excluded from the pairs),
    row 2 holds two images back to back."""
    rows = [
        _image() + [SOT, 5, 6, 7, EOT] + _image(),
        [SOT, 10, 11] + _image() + [12, 13, EOT],
        [SOT, 20] + _image() + _image() + [21, EOT],
    ]
    length = max(len(r) for r in rows) + 3
    ids = torch.tensor([r + [0] * (length - len(r)) for r in rows])
    pixels = torch.randn(
        5, 3, TINY["image_size"], TINY["image_size"], generator=torch.Generator().manual_seed(seed)
    )
    return pixels, ids


# ----------------------------------------------------------------------------------------------------
# the towers against transformers' CLIP


def _openclip_to_hf(state: dict[str, torch.Tensor], tower: str) -> dict[str, torch.Tensor]:
    """OpenCLIP names (``visual.*`` / ``text.*``) -> transformers' CLIP names, in_proj split into q/k/v."""
    out = {}
    for name, value in state.items():
        if not name.startswith(tower + "."):
            continue
        name = name[len(tower) + 1 :]
        if name.startswith("transformer.resblocks."):
            i, rest = name[len("transformer.resblocks.") :].split(".", 1)
            layer = f"encoder.layers.{i}."
            if rest.startswith("attn.in_proj_"):
                kind = rest.rsplit("_", 1)[1]  # weight / bias
                for proj, part in zip("qkv", value.chunk(3)):
                    out[f"{layer}self_attn.{proj}_proj.{kind}"] = part
                continue
            rest = (
                rest.replace("attn.out_proj", "self_attn.out_proj")
                .replace("ln_1", "layer_norm1")
                .replace("ln_2", "layer_norm2")
                .replace("mlp.c_fc", "mlp.fc1")
                .replace("mlp.c_proj", "mlp.fc2")
            )
            out[layer + rest] = value
            continue
        renamed = {
            "conv1.weight": "embeddings.patch_embedding.weight",
            "class_embedding": "embeddings.class_embedding",
            "positional_embedding": "embeddings.position_embedding.weight",
            "ln_pre.weight": "pre_layrnorm.weight",
            "ln_pre.bias": "pre_layrnorm.bias",
            "ln_post.weight": "post_layernorm.weight",
            "ln_post.bias": "post_layernorm.bias",
            "token_embedding.weight": "embeddings.token_embedding.weight",
            "ln_final.weight": "final_layer_norm.weight",
            "ln_final.bias": "final_layer_norm.bias",
        }
        if name == "text_projection":
            continue  # not part of CLIPTextModel
        out[renamed[name]] = value
    return out


def _load_into_hf(hf: torch.nn.Module, ours: dict[str, torch.Tensor]) -> None:
    keys = hf.state_dict().keys()
    prefix = next((p for p in ("vision_model.", "text_model.") if any(k.startswith(p) for k in keys)), "")
    missing, unexpected = hf.load_state_dict({prefix + k: v for k, v in ours.items()}, strict=False)
    assert not unexpected, unexpected
    assert all("position_ids" in k for k in missing), missing


def test_vision_tower_matches_transformers_clip() -> None:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    model, cfg = _model(), _config()
    hf_cfg = CLIPVisionConfig(
        hidden_size=cfg.vision_width,
        intermediate_size=int(cfg.vision_width * cfg.mlp_ratio),
        num_hidden_layers=cfg.vision_layers,
        num_attention_heads=cfg.vision_heads,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        num_channels=3,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
    )
    hf_cfg._attn_implementation = "eager"
    hf = CLIPVisionModel(hf_cfg).eval()
    _load_into_hf(hf, _openclip_to_hf(model.state_dict(), "visual"))
    pixels, _ = _batch()
    with torch.no_grad():
        ours = model.visual(pixels)
        out = hf(pixel_values=pixels)
        ref = getattr(hf, "vision_model", hf).post_layernorm(out.last_hidden_state)[:, 1:]
    assert ours.shape == (5, P, cfg.vision_width)
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-5)


def test_text_tower_matches_transformers_clip_causal() -> None:
    from transformers import CLIPTextConfig, CLIPTextModel

    model, cfg = _model(), _config()
    hf_cfg = CLIPTextConfig(
        vocab_size=VOCAB,
        hidden_size=cfg.text_width,
        intermediate_size=int(cfg.text_width * cfg.mlp_ratio),
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads,
        max_position_embeddings=cfg.context_length,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        pad_token_id=0,
        bos_token_id=SOT,
        eos_token_id=EOT,
    )
    hf_cfg._attn_implementation = "eager"
    hf = CLIPTextModel(hf_cfg).eval()
    _load_into_hf(hf, _openclip_to_hf(model.state_dict(), "text"))
    ids = torch.randint(1, VOCAB, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = model.text.ln_final(model.text(model.text.token_embedding(ids)))
        ref = hf(input_ids=ids).last_hidden_state
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-5)
    # causal: a later token does not change earlier outputs
    changed = ids.clone()
    changed[:, 30] = (changed[:, 30] + 1) % VOCAB
    with torch.no_grad():
        again = model.text.ln_final(model.text(model.text.token_embedding(changed)))
    torch.testing.assert_close(again[:, :30], ours[:, :30], atol=0, rtol=0)
    assert not torch.allclose(again[:, 30], ours[:, 30])


# ----------------------------------------------------------------------------------------------------
# pooling, interleaving, pairs, targets, loss: against loops written here


def _layer_norm(x: torch.Tensor, ln: torch.nn.LayerNorm) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias


def test_attentive_pooling_against_a_per_head_loop() -> None:
    model = _model()
    pp = model.pool_project
    pooler, attn = pp.pooler, pp.pooler.cross_attn
    heads, out_dim = attn.heads, attn.q.weight.shape[0]
    hd = out_dim // heads
    x = torch.randn(3, P, model.config.vision_width, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        pooled, tokens = pp(x)
        query = _layer_norm(pp.query_token[0, 0], pooler.norm1_q) @ attn.q.weight.t() + attn.q_bias
        for n in range(x.shape[0]):
            k = _layer_norm(x[n], pooler.norm1_k) @ attn.k.weight.t() + attn.k_bias  # [P, D]
            v = _layer_norm(x[n], pooler.norm1_v) @ attn.v.weight.t() + attn.v_bias
            per_head = []
            for h in range(heads):
                s = slice(h * hd, (h + 1) * hd)
                scores = torch.tensor([float(query[s] @ k[p, s]) / math.sqrt(hd) for p in range(P)])
                weights = torch.exp(scores - scores.max())
                weights = weights / weights.sum()
                per_head.append(sum(weights[p] * v[p, s] for p in range(P)))
            expected = torch.cat(per_head) @ attn.proj.weight.t()
            torch.testing.assert_close(pooled[n], expected, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(tokens[n], v @ attn.proj.weight.t(), atol=1e-5, rtol=1e-5)
    assert pooled.shape == (3, model.config.embed_dim) and tokens.shape == (3, P, model.config.embed_dim)


def test_embed_puts_image_tokens_at_placeholders_in_row_major_order() -> None:
    model = _model()
    _, ids = _batch()
    tokens = torch.randn(5, P, model.config.text_width, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = model.embed(ids, tokens)
        table = model.text.token_embedding.weight
        flat = tokens.reshape(-1, tokens.shape[-1])
        used = 0
        for b in range(ids.shape[0]):
            for t in range(ids.shape[1]):
                if int(ids[b, t]) == IMG:
                    assert torch.equal(got[b, t], flat[used]), (b, t)
                    used += 1
                else:
                    assert torch.equal(got[b, t], table[int(ids[b, t])]), (b, t)
    assert used == 5 * P
    with pytest.raises(ValueError, match="img_placehold"):
        model.embed(ids, tokens[:4])


def _expected_pairs_and_targets(model: LCLModel, pixels: torch.Tensor, ids: torch.Tensor):
    latents, tokens = model.encode_image(pixels)
    hidden = model.text(model.embed(ids, tokens))
    images, texts, which, logits, labels = [], [], [], [], []
    image = -1
    for b in range(ids.shape[0]):
        for t in range(ids.shape[1]):
            if int(ids[b, t]) == SOI:
                image += 1
                if t > 0:
                    which.append(image)
                    text = model.text.ln_final(hidden[b, t]) @ model.text.text_projection
                    texts.append(text / text.norm())
                    images.append(latents[image] / latents[image].norm())
            if t + 1 < ids.shape[1] and int(ids[b, t + 1]) not in (IMG, EOI, 0):
                logits.append(model.lm_head(hidden[b, t]))
                labels.append(int(ids[b, t + 1]))
    return torch.stack(images), torch.stack(texts), which, torch.stack(logits), torch.tensor(labels)


def test_forward_pairs_and_generation_targets_against_loops() -> None:
    model = _model()
    pixels, ids = _batch()
    with torch.no_grad():
        out = model(pixels, ids)
        images, texts, which, logits, labels = _expected_pairs_and_targets(model, pixels, ids)
    # the image at position 0 of row 0 has no context: dropped together with its <start_of_img>
    assert which == [1, 2, 3, 4]
    torch.testing.assert_close(out.image_features, images, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.text_features, texts, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.logits, logits, atol=1e-5, rtol=1e-5)
    assert torch.equal(out.labels, labels)
    # hand count: row 0 targets SOT 5 6 7 EOT SOI (6), row 1: 10 11 SOI 12 13 EOT (6),
    # row 2: 20 SOI SOI 21 EOT (5); never IMG, EOI or pad
    assert labels.numel() == 17
    assert int((labels == SOI).sum()) == 4 and int((labels == EOT).sum()) == 3
    assert not any(int(x) in (IMG, EOI, 0) for x in labels)
    assert out.logits.shape == (17, VOCAB)
    torch.testing.assert_close(out.logit_scale, model.logit_scale.exp())
    # the text feature at a <start_of_img> summarises what comes before it, not its own image
    changed = pixels.clone()
    changed[1] += 1.0
    with torch.no_grad():
        again = model(changed, ids)
    torch.testing.assert_close(again.text_features[0], out.text_features[0], atol=1e-6, rtol=0)
    assert not torch.allclose(again.image_features[0], out.image_features[0])
    # rows 1 and 2 do not see row 0's images
    torch.testing.assert_close(again.text_features[1:], out.text_features[1:], atol=1e-6, rtol=0)


def _reference_loss(out: LCLOutput, gen_w: float, con_w: float) -> tuple[float, float, float]:
    scale = float(out.logit_scale.detach())
    img, txt = out.image_features.detach().double(), out.text_features.detach().double()
    m = img.shape[0]
    sim = scale * img @ txt.t()  # sim[i, j] = image i . text j

    def ce_rows(matrix: torch.Tensor) -> float:
        total = 0.0
        for i in range(matrix.shape[0]):
            row = [float(v) for v in matrix[i]]
            top = max(row)
            total += top + math.log(sum(math.exp(v - top) for v in row)) - row[i]
        return total / matrix.shape[0]

    contrastive = (ce_rows(sim) + ce_rows(sim.t())) / 2 if m else 0.0
    gen = 0.0
    for row, label in zip(out.logits.detach().double(), out.labels):
        vals = [float(v) for v in row]
        top = max(vals)
        gen += top + math.log(sum(math.exp(v - top) for v in vals)) - vals[int(label)]
    gen /= len(out.labels)
    return gen_w * gen + con_w * contrastive, gen_w * gen, con_w * contrastive


@pytest.mark.parametrize("weights", [None, (0.5, 2.0)])
def test_lcl_loss_against_explicit_infonce(weights) -> None:
    g = torch.Generator().manual_seed(4)
    out = LCLOutput(
        image_features=F.normalize(torch.randn(6, 16, generator=g), dim=-1),
        text_features=F.normalize(torch.randn(6, 16, generator=g), dim=-1),
        logits=torch.randn(9, 30, generator=g),
        labels=torch.randint(0, 30, (9,), generator=g),
        logit_scale=torch.tensor(1 / 0.07),
    )
    gen_w, con_w = weights or (1.0, 0.1)  # the defaults: the official 1.0 / 0.1
    if weights is None:
        got = lcl_loss(out)
    else:
        got = lcl_loss(out, generation_weight=gen_w, contrastive_weight=con_w)
    expected = _reference_loss(out, gen_w, con_w)
    for g_, e in zip(got, expected):
        assert float(g_.detach()) == pytest.approx(e, rel=1e-5, abs=1e-6)


def test_lcl_loss_of_a_forward_pass() -> None:
    model = _model()
    out = model(*_batch())
    got = lcl_loss(out)
    expected = _reference_loss(out, 1.0, 0.1)
    for g_, e in zip(got, expected):
        assert float(g_.detach()) == pytest.approx(e, rel=1e-5, abs=1e-6)
    # a batch whose only image starts its row: no pair, contrastive 0, and no NaN
    ids = torch.tensor([_image() + [SOT, 5, 6, EOT]])
    out = model(_batch()[0][:1], ids)
    assert out.image_features.shape[0] == 0 and out.text_features.shape[0] == 0
    total, gen, con = lcl_loss(out)
    total, gen, con = total.detach(), gen.detach(), con.detach()
    assert float(con) == 0.0 and torch.isfinite(total) and float(total) == pytest.approx(float(gen))


# ----------------------------------------------------------------------------------------------------
# checkpoints


def _outputs_equal(a: LCLModel, b: LCLModel) -> None:
    pixels, ids = _batch()
    with torch.no_grad():
        x, y = a.eval()(pixels, ids), b.eval()(pixels, ids)
    for name in ("image_features", "text_features", "logits", "labels", "logit_scale"):
        assert torch.equal(getattr(x, name), getattr(y, name)), name


def test_save_load_round_trip(tmp_path) -> None:
    model = _model()
    path = save_lcl(model, tmp_path / "lcl")
    loaded = load_lcl(path)
    assert asdict(loaded.config) == asdict(model.config)
    _outputs_equal(model, loaded)


def _official_config(cfg: LCLConfig) -> dict:
    return {
        "embed_dim": cfg.embed_dim,
        "vision_cfg": {
            "image_size": cfg.image_size,
            "layers": cfg.vision_layers,
            "width": cfg.vision_width,
            "patch_size": cfg.patch_size,
            "head_width": cfg.vision_width // cfg.vision_heads,  # OpenCLIP's key; 64 when absent
        },
        "text_cfg": {
            "context_length": cfg.context_length,
            "vocab_size": cfg.vocab_size,
            "width": cfg.text_width,
            "heads": cfg.text_heads,
            "layers": cfg.text_layers,
        },
        "pool_project_cfg": {
            "pool_proj_type": "attn",
            "input_dim": cfg.vision_width,
            "output_dim": cfg.embed_dim,
            "attn_num_heads": cfg.pool_heads,
        },
        "special_token_ids": dict(SPECIAL),
        "custom_text": True,
    }


def _write_openclip(tmp_path, state: dict[str, torch.Tensor]):
    weights = tmp_path / "epoch_1.pt"
    torch.save({"epoch": 1, "state_dict": {"module." + k: v for k, v in state.items()}}, weights)
    config = tmp_path / "LCL_tiny.json"
    config.write_text(json.dumps(_official_config(_config())))
    return weights, config


def test_load_official_openclip_checkpoint(tmp_path) -> None:
    model = _model()
    weights, config = _write_openclip(tmp_path, model.state_dict())
    loaded = load_lcl(weights, config=config)
    assert asdict(loaded.config) == asdict(model.config)
    _outputs_equal(model, loaded)


def test_load_rejects_missing_and_extra_weights(tmp_path) -> None:
    state = _model().state_dict()
    missing = dict(state)
    del missing["pool_project.pooler.cross_attn.v_bias"]
    weights, config = _write_openclip(tmp_path, missing)
    with pytest.raises(CheckpointError) as err:
        load_lcl(weights, config=config)
    assert "pool_project.pooler.cross_attn.v_bias" in str(err.value) and "\n" not in str(err.value)

    extra = {**state, "visual.proj": torch.zeros(64, 64)}
    weights, config = _write_openclip(tmp_path, extra)
    with pytest.raises(CheckpointError) as err:
        load_lcl(weights, config=config)
    assert "visual.proj" in str(err.value) and "\n" not in str(err.value)


# ----------------------------------------------------------------------------------------------------
# gradients


def test_both_loss_terms_reach_the_vision_tower() -> None:
    model = _model().train()
    _, gen, con = lcl_loss(model(*_batch()))
    vision = [model.visual.conv1.weight, model.visual.transformer.resblocks[0].attn.in_proj_weight]
    for term in (gen, con):
        grads = torch.autograd.grad(term, vision, retain_graph=True)
        for grad in grads:
            assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    (g_scale,) = torch.autograd.grad(con, [model.logit_scale], retain_graph=True)
    assert g_scale.abs() > 0


# ----------------------------------------------------------------------------------------------------
# two processes (gloo): each rank's InfoNCE against every rank's features, padding masked

_CASES = [(3, 1), (2, 0), (0, 0)]  # pairs per rank; a rank with none must still join the collectives
_DIM, _SCALE, _CON_W = 8, 12.0, 0.1


def _rank_features(case: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 * case + rank)
    n = _CASES[case][rank]
    return (
        F.normalize(torch.randn(n, _DIM, generator=g), dim=-1),
        F.normalize(torch.randn(n, _DIM, generator=g), dim=-1),
    )


def _dist_worker(rank: int, world: int, init: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=init, rank=rank, world_size=world, timeout=timedelta(seconds=30)
    )
    try:
        for case in range(len(_CASES)):
            img, txt = (t.requires_grad_() for t in _rank_features(case, rank))
            scale = torch.tensor(_SCALE, requires_grad=True)  # a parameter: every rank's loss has a graph
            out = LCLOutput(img, txt, torch.zeros(0, 5), torch.zeros(0, dtype=torch.long), scale)
            total, _, con = lcl_loss(out, contrastive_weight=_CON_W)
            total.backward()
            torch.save(
                {"con": con.detach(), "total": total.detach(), "img": img.grad, "txt": txt.grad},
                f"{out_dir}/{case}_{rank}.pt",
            )
    finally:
        dist.destroy_process_group()


def test_contrastive_loss_across_two_processes(tmp_path) -> None:
    import torch.multiprocessing as mp

    mp.spawn(_dist_worker, args=(2, f"file://{tmp_path}/rendezvous", str(tmp_path)), nprocs=2, join=True)
    for case, counts in enumerate(_CASES):
        leaves = [[t.double().requires_grad_() for t in _rank_features(case, r)] for r in range(2)]
        losses = []
        for r in range(2):
            img, txt = leaves[r]
            order = [r] + [o for o in range(2) if o != r]
            all_img = torch.cat([leaves[o][0] for o in order])
            all_txt = torch.cat([leaves[o][1] for o in order])
            if counts[r]:
                target = torch.arange(counts[r])
                i2t = F.cross_entropy(_SCALE * img @ all_txt.t(), target)
                t2i = F.cross_entropy(_SCALE * txt @ all_img.t(), target)
                losses.append(_CON_W * (i2t + t2i) / 2)
            else:
                losses.append(torch.zeros((), dtype=torch.double))
        total = sum(losses)
        if total.requires_grad:
            total.backward()
        for r in range(2):
            got = torch.load(tmp_path / f"{case}_{r}.pt")
            want = pytest.approx(float(losses[r].detach()), rel=1e-5, abs=1e-7)
            assert float(got["con"]) == want and float(got["total"]) == want, (counts, r)
            # gathered with grad: each rank's features get the gradient of every rank's loss
            for k, leaf in zip(("img", "txt"), leaves[r]):
                want = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
                grad = got[k] if got[k] is not None else torch.zeros_like(leaf)
                torch.testing.assert_close(grad.double(), want, atol=1e-5, rtol=1e-4)


def test_a_config_that_is_no_lcl_config_is_one_clear_line(tmp_path, capsys):
    """A folder whose config.json is not an object, or an official-layout config lacking a section,
    is named as not an LCL config (not a TypeError or KeyError from inside)."""
    from interleaf.cli import main

    for name, text in (("list", "[]"), ("partial", '{"vision_cfg": {}, "embed_dim": 512}')):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text(text)
        (folder / "model.safetensors").write_bytes(b"")
        capsys.readouterr()
        assert main(["lcl", "export-vit", str(folder), "-o", str(tmp_path / "vit")]) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: {folder / 'config.json'}: not an LCL config") and "\n" not in err
