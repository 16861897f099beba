"""SuperLinkGroundingDino: transformers' Grounding DINO fed by LLM route queries (VisionLLM v2).

The reference tests run transformers' own ``GroundingDinoForObjectDetection`` on real token ids and
check that ``detect_with_text``, given the same projected text features and masks, reproduces its
outputs and loss. The rest covers the super-link side: route masks, patch2query, loss and gradients,
a short overfit, post-processing.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import GroundingDinoForObjectDetection, SwinConfig
from transformers.models.grounding_dino.modeling_grounding_dino import (
    build_label_maps,
    build_text_mask,
    generate_masks_with_special_tokens_and_transfer_map,
)

from interleaf.model.grounding_dino import (
    SuperLinkDetectionOutput,
    SuperLinkGroundingDino,
    TextDetectionOutput,
    build_grounding_dino,
    mask_logits,
    pixel_masks,
    tiny_grounding_dino_config,
)

LLM_HIDDEN = 24
TEXT_PREFIXES = ("model.text_backbone.", "model.text_projection.")


def _model(seed: int = 0, **overrides: object) -> SuperLinkGroundingDino:
    torch.manual_seed(seed)
    return SuperLinkGroundingDino(tiny_grounding_dino_config(**overrides), LLM_HIDDEN)


def _pixels(batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def _queries(batch: int, routes: int, seed: int = 2) -> torch.Tensor:
    return torch.randn(batch, routes, 4, LLM_HIDDEN, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------- construction


def test_no_text_encoder_weights_and_official_patch2query_names():
    config = tiny_grounding_dino_config()
    model = SuperLinkGroundingDino(config, LLM_HIDDEN)
    keys = list(model.state_dict())
    assert not [k for k in keys if "text_backbone" in k or "text_projection" in k]
    assert [k for k in keys if k.startswith("patch2query.")] == [
        f"patch2query.layers.{i}.{p}" for i in range(3) for p in ("weight", "bias")
    ]
    assert model.patch2query.layers[0].in_features == LLM_HIDDEN
    assert model.patch2query.layers[2].out_features == config.d_model
    assert torch.all(model.patch2query.layers[2].bias == 0)
    # the caller's config is untouched and the model's records the same text config
    assert config.text_config.vocab_size == 1030
    assert model.gdino.config.text_config.to_dict() == config.text_config.to_dict()


# ---------------------------------------------------------------------------- reference equivalence


def _reference_pair(**overrides: object) -> tuple[GroundingDinoForObjectDetection, SuperLinkGroundingDino]:
    torch.manual_seed(0)
    config = tiny_grounding_dino_config(**overrides)
    reference = build_grounding_dino(config).eval()  # transformers' class (and forward)
    assert type(reference) is GroundingDinoForObjectDetection
    ours = SuperLinkGroundingDino(config, LLM_HIDDEN).eval()
    state = {k: v for k, v in reference.state_dict().items() if not k.startswith(TEXT_PREFIXES)}
    ours.gdino.load_state_dict(state, strict=True)
    return reference, ours


@pytest.mark.parametrize(
    "overrides",
    [{}, {"two_stage": False}, {"auxiliary_loss": True}],
    ids=["two_stage", "one_stage", "two_stage_aux_loss"],
)
def test_detect_with_text_reproduces_transformers(overrides):
    reference, ours = _reference_pair(**overrides)
    # "a b. c." and "d. e f." with trailing padding in the second, within the tiny BERT vocab
    input_ids = torch.tensor([[101, 5, 6, 1012, 7, 1012, 102], [101, 8, 1012, 9, 10, 1012, 102]])
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, -1] = 0
    pixel_values = _pixels()
    pixel_mask = torch.ones(2, 64, 64, dtype=torch.long)
    pixel_mask[1, :, 40:] = 0  # a padded image exercises the pixel-mask paths
    labels = [
        {
            "class_labels": torch.tensor([0, 1]),
            "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.5, 0.3, 0.4]]),
        },
        {"class_labels": torch.tensor([1]), "boxes": torch.tensor([[0.4, 0.5, 0.2, 0.3]])},
    ]
    with torch.no_grad():
        expected = reference(
            pixel_values=pixel_values,
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_mask=pixel_mask,
            labels=labels,
        )
        # transformers' text side, as its GroundingDinoModel.forward computes it
        self_attn, position_ids = generate_masks_with_special_tokens_and_transfer_map(
            input_ids, reference.model.special_tokens
        )
        text = reference.model.text_backbone(
            input_ids, self_attn[:, None], torch.zeros_like(input_ids), position_ids, return_dict=True
        ).last_hidden_state
        text = reference.model.text_projection(text)

        got = ours.detect_with_text(
            pixel_values, pixel_mask, text, attention_mask.bool(), self_attn, position_ids
        )
        loss, loss_dict = ours.detection_loss(
            got, labels, build_label_maps(got.logits, input_ids), build_text_mask(got.logits, attention_mask)
        )

    close = {"rtol": 0, "atol": 1e-6}
    torch.testing.assert_close(got.logits, expected.logits, **close)
    torch.testing.assert_close(got.pred_boxes, expected.pred_boxes, **close)
    torch.testing.assert_close(got.last_hidden_state, expected.last_hidden_state, **close)
    torch.testing.assert_close(
        got.encoder_last_hidden_state_text, expected.encoder_last_hidden_state_text, **close
    )
    if ours.config.two_stage:
        torch.testing.assert_close(got.encoder_logits, expected.encoder_logits, **close)
        torch.testing.assert_close(got.encoder_pred_boxes, expected.encoder_pred_boxes, **close)
        torch.testing.assert_close(got.enc_outputs_class, expected.enc_outputs_class, **close)
    else:
        assert got.encoder_logits is None and expected.encoder_logits is None
    torch.testing.assert_close(loss, expected.loss, rtol=1e-6, atol=1e-6)
    assert set(loss_dict) == set(expected.loss_dict)
    for key, value in expected.loss_dict.items():
        torch.testing.assert_close(loss_dict[key], value, rtol=1e-6, atol=1e-6)
    if overrides.get("auxiliary_loss"):
        assert "loss_ce_0" in loss_dict
    keys = set(ours.state_dict())
    assert ("gdino.model.reference_points.weight" in keys) != ours.config.two_stage
    assert ("gdino.model.enc_output.weight" in keys) == ours.config.two_stage


@pytest.mark.parametrize("two_stage", [True, False])
def test_runs_without_embedding_init_target(two_stage):
    """Both combinations transformers' own forward fails on (no learned target for two stage: the
    top-k encoder features are the decoder targets)."""
    model = _model(two_stage=two_stage, embedding_init_target=False).eval()
    with torch.no_grad():
        out = model(_pixels(), _queries(2, 2), torch.tensor([[True, True], [True, False]]))
    assert out.logits.shape == (2, 20, 2)
    assert torch.isfinite(out.pred_boxes).all()


# ---------------------------------------------------------------------------- super-link text side


def test_text_features_masks_and_position_ids():
    model = _model()
    route_mask = torch.tensor([[True, False, False], [True, True, True]])
    tokens, self_attn, position_ids = model.text_features(_queries(2, 3), route_mask)
    assert tokens.shape == (2, 3, 32)
    assert torch.equal(
        self_attn,
        torch.tensor(
            [
                [[True, False, False], [False, True, False], [False, False, True]],
                [[True, True, True], [True, True, True], [True, True, True]],
            ]
        ),
    )
    assert torch.equal(position_ids, torch.tensor([[0, 0, 0], [0, 1, 2]]))
    assert torch.all(tokens[0, 1:] == 0)  # padded route tokens carry nothing
    assert torch.all(tokens[1].abs().sum(-1) > 0)


def test_patch2query_is_the_mean_over_the_route_queries():
    model = _model()
    queries = _queries(2, 3)
    tokens, _, _ = model.text_features(queries, torch.ones(2, 3, dtype=torch.bool))
    layers = model.patch2query.layers
    for b in range(2):
        for r in range(3):
            per_query = [
                layers[2](torch.relu(layers[1](torch.relu(layers[0](queries[b, r, e]))))) for e in range(4)
            ]
            torch.testing.assert_close(tokens[b, r], torch.stack(per_query).mean(0), rtol=1e-6, atol=1e-6)


def test_padded_route_slots_never_change_any_output():
    model = _model().eval()
    pixel_values = _pixels()
    route_mask = torch.tensor([[True, False, False], [True, True, True]])
    queries = _queries(2, 3)
    other = queries.clone()
    other[0, 1:] = 100 * torch.randn(2, 4, LLM_HIDDEN, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        a = model(pixel_values, queries, route_mask)
        b = model(pixel_values, other, route_mask)
    assert a.logits.shape == (2, 20, 3)
    assert torch.isneginf(a.logits[0, :, 1:]).all()
    assert torch.isfinite(a.logits[0, :, 0]).all() and torch.isfinite(a.logits[1]).all()
    assert torch.isneginf(a.encoder_logits[0, :, 1:]).all()
    for field in ("logits", "pred_boxes", "encoder_logits", "encoder_pred_boxes"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    assert torch.equal(
        a.detection.encoder_last_hidden_state_vision, b.detection.encoder_last_hidden_state_vision
    )
    # ... while a valid route's queries do matter
    changed = queries.clone()
    changed[1, 2] += 1.0
    with torch.no_grad():
        c = model(pixel_values, changed, route_mask)
    assert not torch.equal(a.logits[1], c.logits[1])


def test_bad_route_inputs_are_refused():
    model = _model().eval()
    with pytest.raises(ValueError, match="at least one valid"):
        model(_pixels(), _queries(2, 2), torch.tensor([[True, False], [False, False]]))
    with pytest.raises(ValueError, match="max_text_len"):
        model(_pixels(), _queries(2, 17), torch.ones(2, 17, dtype=torch.bool))
    labels = [
        {"class_labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])},
        {"class_labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])},
    ]
    with pytest.raises(ValueError, match="outside its 1 valid routes"):
        model(_pixels(), _queries(2, 2), torch.tensor([[True, False], [True, True]]), labels=labels)


# ---------------------------------------------------------------------------- loss


def _sample(detection: TextDetectionOutput, i: int) -> TextDetectionOutput:
    fields = {}
    for field in dataclasses.fields(detection):
        value = getattr(detection, field.name)
        if value is None:
            fields[field.name] = None
        elif field.name in ("outputs_class", "outputs_coord"):  # [L, B, ...]
            fields[field.name] = value[:, i : i + 1]
        else:
            fields[field.name] = value[i : i + 1]
    return TextDetectionOutput(**fields)


def test_loss_with_uneven_routes_matches_per_sample_losses():
    """Samples with 1, 3 and 2 valid routes. transformers' criterion offsets each sample's labels by
    the size of its own label map, which breaks (IndexError or another sample's map) when maps
    differ in size; ours are identical per sample, so the batch loss must equal the per-sample
    losses weighted by their box counts (matching is per sample, normalisation by all boxes)."""
    model = _model(auxiliary_loss=True).eval()
    route_mask = torch.tensor([[True, False, False], [True, True, True], [True, True, False]])
    labels = [
        {"class_labels": torch.tensor([0]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2]])},
        {
            "class_labels": torch.tensor([2, 1]),
            "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.2], [0.7, 0.2, 0.1, 0.1]]),
        },
        {"class_labels": torch.tensor([1]), "boxes": torch.tensor([[0.6, 0.6, 0.3, 0.3]])},
    ]
    with torch.no_grad():
        out = model(_pixels(3), _queries(3, 3), route_mask, labels=labels)
        width = out.detection.logits.shape[-1]
        per_sample = []
        for i in range(3):
            detection = _sample(out.detection, i)
            text_mask = torch.zeros_like(detection.logits, dtype=torch.bool)
            text_mask[..., :3] = route_mask[i]
            maps = model.route_label_maps(route_mask[i : i + 1], width)
            per_sample.append(model.detection_loss(detection, [labels[i]], maps, text_mask)[1])
    counts = torch.tensor([1.0, 2.0, 1.0])
    for key in ("loss_ce", "loss_bbox", "loss_giou", "loss_ce_enc", "loss_ce_0", "loss_giou_0"):
        expected = sum(d[key] * n for d, n in zip(per_sample, counts)) / counts.sum()
        torch.testing.assert_close(out.loss_dict[key], expected, rtol=1e-5, atol=1e-6)


def test_loss_is_finite_and_reaches_patch2query_and_the_queries():
    model = _model().train()
    route_mask = torch.tensor([[True, False], [True, True]])
    queries = _queries(2, 2).requires_grad_(True)
    labels = [
        {"class_labels": torch.tensor([0]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2]])},
        {"class_labels": torch.tensor([1]), "boxes": torch.tensor([[0.6, 0.5, 0.3, 0.2]])},
    ]
    out = model(_pixels(), queries, route_mask, labels=labels)
    assert torch.isfinite(out.loss)
    assert {"loss_ce", "loss_bbox", "loss_giou", "loss_ce_enc"} <= set(out.loss_dict)
    out.loss.backward()
    for layer in model.patch2query.layers:
        assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    assert queries.grad[route_mask].abs().sum(-1).gt(0).all()
    assert torch.all(queries.grad[~route_mask] == 0)  # padded slots get nothing back either


def _square_batch() -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    """Two 64x64 grey images with a red and a blue square; targets in normalised cxcywh."""
    images = torch.full((2, 3, 64, 64), 0.5)
    squares = [(8, 24, 10, 30, (1.0, 0.0, 0.0)), (30, 60, 36, 52, (0.0, 0.0, 1.0))]
    labels = []
    for i, (y0, y1, x0, x1, rgb) in enumerate(squares):
        images[i, :, y0:y1, x0:x1] = torch.tensor(rgb)[:, None, None]
        box = torch.tensor([[(x0 + x1) / 128, (y0 + y1) / 128, (x1 - x0) / 64, (y1 - y0) / 64]])
        labels.append({"class_labels": torch.tensor([0]), "boxes": box})
    return images, labels


def _iou(a: list[float], b: list[float]) -> float:
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = width * height
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def test_short_overfit_reduces_the_loss_and_finds_the_squares():
    # dropout off: 100 noisy steps are not enough to show the box terms going down
    model = _model(seed=0, dropout=0.0, fusion_droppath=0.0).train()
    images, labels = _square_batch()
    queries = _queries(2, 1)
    route_mask = torch.ones(2, 1, dtype=torch.bool)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses, box_losses = [], []
    for _ in range(100):
        out = model(images, queries, route_mask, labels=labels)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
        box_losses.append((out.loss_dict["loss_bbox"] + out.loss_dict["loss_giou"]).item())
    # (the two-stage encoder terms stay: transformers detaches the encoder boxes it scores)
    assert sum(losses[-5:]) / 5 < 0.5 * losses[0], (losses[0], losses[-5:])
    assert sum(box_losses[-5:]) / 5 < 0.5 * box_losses[0], (box_losses[0], box_losses[-5:])

    model.eval()
    with torch.no_grad():
        out = model(images, queries, route_mask)
    for found, target in zip(model.postprocess(out, [(64, 64), (64, 64)], threshold=0.5), labels):
        assert found["routes"][0] == 0 and found["scores"][0] > 0.5
        cx, cy, w, h = (target["boxes"][0] * 64).tolist()
        assert _iou(found["boxes"][0].tolist(), [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]) > 0.4


# ---------------------------------------------------------------------------- post-processing


def test_postprocess_picks_valid_routes_and_scales_boxes_to_pixels():
    inf = float("inf")
    logits = torch.tensor(
        [
            # sample 0: only route 0 is valid (route 1's high score must be ignored)
            [[2.0, 9.0], [-3.0, 9.0], [0.5, 9.0]],
            # sample 1: two valid routes
            [[-1.0, 3.0], [1.0, -2.0], [-6.0, -5.0]],
        ]
    )
    logits[0, :, 1] = -inf
    route_mask = torch.tensor([[True, False], [True, True]])
    pred_boxes = torch.tensor(
        [
            [[0.5, 0.5, 0.2, 0.4], [0.1, 0.1, 0.1, 0.1], [0.25, 0.75, 0.5, 0.5]],
            [[0.5, 0.5, 1.0, 1.0], [0.2, 0.3, 0.2, 0.2], [0.9, 0.9, 0.1, 0.1]],
        ]
    )
    outputs = SuperLinkDetectionOutput(
        logits=logits,
        pred_boxes=pred_boxes,
        route_mask=route_mask,
        detection=None,  # type: ignore[arg-type]
    )
    results = SuperLinkGroundingDino.postprocess(outputs, [(100, 200), (50, 40)], threshold=0.5)
    first, second = results
    torch.testing.assert_close(first["scores"], torch.sigmoid(torch.tensor([2.0, 0.5])))
    assert first["routes"].tolist() == [0, 0]
    # (cx, cy, w, h) normalised -> xyxy in pixels of a 200 wide, 100 high image
    torch.testing.assert_close(
        first["boxes"], torch.tensor([[80.0, 30.0, 120.0, 70.0], [0.0, 50.0, 100.0, 100.0]])
    )
    torch.testing.assert_close(second["scores"], torch.sigmoid(torch.tensor([3.0, 1.0])))
    assert second["routes"].tolist() == [1, 0]
    torch.testing.assert_close(
        second["boxes"], torch.tensor([[0.0, 0.0, 40.0, 50.0], [4.0, 10.0, 12.0, 20.0]])
    )


def test_postprocess_on_a_forward():
    model = _model().eval()
    route_mask = torch.tensor([[True, False, False], [True, True, True]])
    with torch.no_grad():
        out = model(_pixels(), _queries(2, 3), route_mask)
    results = model.postprocess(out, torch.tensor([[64, 64], [128, 96]]), threshold=0.0)
    assert [len(r["scores"]) for r in results] == [20, 20]
    assert results[0]["routes"].eq(0).all()
    assert results[1]["routes"].lt(3).all()
    for r in results:
        assert torch.all(r["scores"][:-1] >= r["scores"][1:])
        assert r["boxes"].shape == (20, 4)


def test_postprocess_of_a_bf16_model_gives_float32_pixel_boxes():
    """A bf16 model's boxes were scaled to pixels in bf16: 8 significant bits, so a box edge near
    x = 1000 moved by up to 4 pixels (detect() on a bf16 model)."""
    boxes = torch.tensor([[[0.6914, 0.3027, 0.2031, 0.1172], [0.1, 0.9, 0.05, 0.08]]]).bfloat16()
    outputs = SuperLinkDetectionOutput(
        logits=torch.tensor([[[3.0], [2.0]]]).bfloat16(),
        pred_boxes=boxes,
        route_mask=torch.tensor([[True]]),
        detection=None,  # type: ignore[arg-type]
    )
    found = SuperLinkGroundingDino.postprocess(outputs, [(1000, 1500)], threshold=0.5)[0]
    cx, cy, w, h = boxes[0].float().unbind(-1)
    want = torch.stack(
        [(cx - w / 2) * 1500, (cy - h / 2) * 1000, (cx + w / 2) * 1500, (cy + h / 2) * 1000], -1
    )
    assert found["boxes"].dtype == found["scores"].dtype == torch.float32
    torch.testing.assert_close(found["boxes"], want, atol=1e-3, rtol=0)
    torch.testing.assert_close(found["scores"], torch.sigmoid(torch.tensor([3.0, 2.0])), atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------- the mask head ([SEG])


def test_mask_head_has_the_official_names_and_keeps_the_finest_level_for_masks():
    plain = _model()
    assert not any("mask" in k or "lateral" in k or "output_convs" in k for k in plain.state_dict())

    model = _model(mask_dim=32)
    names = set(model.state_dict())
    # upstream's OVGroundingDinoForObjectDetection: detectron2 Conv2d + GN in the pixel decoder
    for name in (
        "gdino.model.lateral_convs.0.weight", "gdino.model.lateral_convs.0.norm.weight",
        "gdino.model.output_convs.0.weight", "gdino.model.output_convs.0.norm.bias",
        "gdino.model.mask_features.weight", "gdino.model.mask_features.bias",
        "gdino.model.mask_embed.layers.2.weight", "gdino.mask_embed.0.layers.0.weight",
        "gdino.mask_embed.1.layers.2.bias",
    ):  # fmt: skip
        assert name in names, name
    assert "gdino.model.lateral_convs.0.bias" not in names  # norm "GN": the conv has no bias
    gdino = model.gdino
    assert gdino.mask_embed[0] is gdino.mask_embed[1]  # one head for every decoder layer, as upstream
    # the mask MLPs start with their last layer at zero (transformers' init of a missing head)
    assert gdino.mask_embed[0].layers[-1].weight.abs().sum() == 0
    # Swin stages at strides 4, 8, 16, 32: the first is the masks', the transformer gets 8..32 + one
    # stride-2 conv level, as without a mask head
    channels = gdino.model.backbone.conv_encoder.intermediate_channel_sizes
    assert channels == [16, 32, 64, 128]
    projections = gdino.model.input_proj_vision
    assert [p[0].in_channels for p in projections] == [32, 64, 128, 128]
    assert [p[0].kernel_size for p in projections] == [(1, 1)] * 3 + [(3, 3)]
    assert gdino.model.lateral_convs[0].in_channels == 16

    one_level = SwinConfig(image_size=64, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[1, 2],
                           window_size=4, out_indices=[2])  # fmt: skip
    with pytest.raises(ValueError, match="at least two output levels"):
        _model(mask_dim=32, backbone_config=one_level)


def test_mask_features_follow_the_official_pixel_decoder():
    """F = mask_features(output_conv(lateral(finest backbone map) + bilinear(encoder level 0))), the
    encoder reads strides 8..64 only, and a query's mask logits are mask_embed(hidden) . F."""
    model = _model(mask_dim=32).eval()
    for head in (model.gdino.mask_embed[0], model.gdino.model.mask_embed):  # not zero, to test the product
        torch.nn.init.normal_(head.layers[-1].weight, std=0.5)
    seen = {}
    model.gdino.model.backbone.register_forward_hook(lambda m, i, o: seen.update(backbone=o[0]))
    model.gdino.model.encoder.register_forward_hook(lambda m, i, o: seen.update(encoder=o))
    model.gdino.model.decoder.register_forward_hook(lambda m, i, o: seen.update(decoder=o))
    route_mask = torch.tensor([[True, True], [True, False]])
    with torch.no_grad():
        out = model(_pixels(), _queries(2, 2), route_mask)
        d = out.detection
        finest = seen["backbone"][0][0]
        assert finest.shape[-2:] == (16, 16)  # stride 4 on 64 x 64
        memory = seen["encoder"].last_hidden_state_vision
        assert memory.shape[1] == 8 * 8 + 4 * 4 + 2 * 2 + 1 * 1  # strides 8, 16, 32, 64
        level0 = memory[:, :64].transpose(1, 2).reshape(2, 32, 8, 8)
        m = model.gdino.model
        up = torch.nn.functional.interpolate(level0, size=(16, 16), mode="bilinear", align_corners=False)
        want = m.mask_features(m.output_convs[0](m.lateral_convs[0](finest) + up))
        torch.testing.assert_close(d.mask_features, want)
        hidden = seen["decoder"].intermediate_hidden_states
        for layer in range(2):
            emb = model.gdino.mask_embed[layer](hidden[:, layer])
            torch.testing.assert_close(d.mask_embeddings[layer], emb)
        torch.testing.assert_close(out.pred_masks(), torch.einsum("bqc,bchw->bqhw", emb, want))
    assert out.pred_masks().shape == (2, 20, 16, 16)
    assert d.mask_stride == 4 and d.input_sizes == [(64, 64), (64, 64)] and d.padded_size == (64, 64)
    assert d.encoder_mask_embeddings.shape == (2, 20, 32)


def test_padded_route_slots_never_change_the_masks():
    model = _model(mask_dim=32).eval()
    torch.nn.init.normal_(model.gdino.mask_embed[0].layers[-1].weight, std=0.5)
    route_mask = torch.tensor([[True, False, False], [True, True, True]])
    queries = _queries(2, 3)
    other = queries.clone()
    other[0, 1:] = 100 * torch.randn(2, 4, LLM_HIDDEN, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        a, b = model(_pixels(), queries, route_mask), model(_pixels(), other, route_mask)
    assert torch.equal(a.pred_masks(), b.pred_masks())
    assert torch.equal(a.detection.mask_features, b.detection.mask_features)


def test_point_mask_losses_are_mask2formers():
    """The official loss_masks is Mask2Former's: same point sampling (draw for draw), same terms."""
    from transformers import Mask2FormerConfig
    from transformers.models.mask2former.modeling_mask2former import Mask2FormerLoss

    from interleaf.model.grounding_dino import point_mask_losses

    gen = torch.Generator().manual_seed(3)
    pred = torch.randn(5, 12, 10, generator=gen) * 3
    target = (torch.rand(5, 48, 40, generator=gen) > 0.6).float()
    config = Mask2FormerConfig(train_num_points=300, oversample_ratio=3.0, importance_sample_ratio=0.75)
    reference = Mask2FormerLoss(config, weight_dict={})
    indices = [(torch.arange(5), torch.arange(5))]
    torch.manual_seed(11)
    want = reference.loss_masks(pred[None], [target], indices, num_masks=4)
    torch.manual_seed(11)
    loss_mask, loss_dice = point_mask_losses(pred, target, 4, 300, 3.0, 0.75)
    torch.testing.assert_close(loss_mask, want["loss_mask"], rtol=0, atol=0)
    torch.testing.assert_close(loss_dice, want["loss_dice"], rtol=0, atol=0)
    # and every point random (importance 0) still matches
    config = Mask2FormerConfig(train_num_points=64, oversample_ratio=2.0, importance_sample_ratio=0.0)
    torch.manual_seed(5)
    want = Mask2FormerLoss(config, weight_dict={}).loss_masks(pred[None], [target], indices, num_masks=5)
    torch.manual_seed(5)
    got = point_mask_losses(pred, target, 5, 64, 2.0, 0.0)
    torch.testing.assert_close(got, (want["loss_mask"], want["loss_dice"]), rtol=0, atol=0)


def _mask_labels(with_masks: tuple[bool, bool] = (True, True)) -> list[dict[str, torch.Tensor]]:
    masks = torch.zeros(1, 64, 48)
    masks[0, 10:30, 8:20] = 1
    second = torch.zeros(2, 64, 64)
    second[0, 40:60, 40:60] = 1
    second[1, 5:15, 30:50] = 1
    labels = [
        {"class_labels": torch.tensor([0]), "boxes": torch.tensor([[14 / 48, 20 / 64, 12 / 48, 20 / 64]])},
        {"class_labels": torch.tensor([1, 2]), "boxes": torch.tensor([[50 / 64, 50 / 64, 20 / 64, 20 / 64],
                                                                      [40 / 64, 10 / 64, 20 / 64, 10 / 64]])},
    ]  # fmt: skip
    for label, mask, keep in zip(labels, (masks, second), with_masks):
        if keep:
            label["masks"] = mask
    return labels


def test_mask_loss_terms_reach_the_mask_head_and_the_queries():
    model = _model(mask_dim=32, auxiliary_loss=True).train()
    route_mask = torch.tensor([[True, False, False], [True, True, True]])
    pixel_mask = torch.ones(2, 64, 64, dtype=torch.long)
    pixel_mask[0, :, 48:] = 0  # sample 0 is a 64 x 48 image padded to 64 x 64
    queries = _queries(2, 3).requires_grad_(True)
    out = model(_pixels(), queries, route_mask, pixel_mask=pixel_mask, labels=_mask_labels())
    keys = {f"loss_{t}{s}" for t in ("mask", "dice") for s in ("", "_0", "_enc")}
    assert keys <= set(out.loss_dict) and all(torch.isfinite(out.loss_dict[k]) for k in keys)
    # the zero-initialised last layers make every logit 0: BCE is log 2 on every point
    for suffix in ("", "_0", "_enc"):
        torch.testing.assert_close(out.loss_dict[f"loss_mask{suffix}"], torch.tensor(0.6931472))
    assert out.detection.input_sizes == [(64, 48), (64, 64)]
    out.loss.backward()
    assert model.gdino.mask_embed[0].layers[-1].weight.grad.abs().sum() > 0
    assert model.gdino.model.mask_embed.layers[-1].weight.grad.abs().sum() > 0

    # after a step the masks depend on the image: gradients reach the pixel decoder and the queries
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    model.zero_grad()
    out = model(_pixels(), queries, route_mask, pixel_mask=pixel_mask, labels=_mask_labels())
    out.loss.backward()
    assert model.gdino.model.lateral_convs[0].weight.grad.abs().sum() > 0
    assert model.gdino.model.mask_features.weight.grad.abs().sum() > 0
    assert queries.grad[route_mask].abs().sum(-1).gt(0).all()

    # the box terms are the ones without masks, and the total adds the weighted mask terms
    model.eval()
    torch.manual_seed(0)
    with torch.no_grad():
        plain = model(
            _pixels(), queries, route_mask, pixel_mask=pixel_mask, labels=_mask_labels((False, False))
        )
        torch.manual_seed(0)
        masked = model(_pixels(), queries, route_mask, pixel_mask=pixel_mask, labels=_mask_labels())
    assert not any("mask" in k or "dice" in k for k in plain.loss_dict)
    for key, value in plain.loss_dict.items():
        torch.testing.assert_close(masked.loss_dict[key], value)
    extra = sum(5.0 * masked.loss_dict[k] for k in keys)
    torch.testing.assert_close(masked.loss, plain.loss + extra)


def test_mask_loss_counts_only_the_samples_with_masks():
    model = _model(mask_dim=32).eval()
    torch.nn.init.normal_(model.gdino.mask_embed[0].layers[-1].weight, std=0.5)
    route_mask = torch.tensor([[True, False, False], [True, True, True]])
    with torch.no_grad():
        out = model(_pixels(), _queries(2, 3), route_mask, labels=_mask_labels((False, True)))
        d = out.detection
        labels = _mask_labels((False, True))
        maps = model.route_label_maps(route_mask, d.logits.shape[-1])
        torch.manual_seed(4)
        total, terms = model.mask_loss(d, labels, maps)
        # by hand: sample 1's matched pairs (the box matching's), normalised by its 2 masks
        from transformers.loss.loss_grounding_dino import GroundingDinoHungarianMatcher

        from interleaf.model.grounding_dino import point_mask_losses

        c = model.config
        matcher = GroundingDinoHungarianMatcher(
            class_cost=c.class_cost, bbox_cost=c.bbox_cost, giou_cost=c.giou_cost
        )
        src, tgt = matcher({"logits": d.logits, "pred_boxes": d.pred_boxes, "label_maps": maps}, labels)[1]
        pred = out.pred_masks()[1, src]
        torch.manual_seed(4)
        want = point_mask_losses(pred, labels[1]["masks"][tgt], 2, c.mask_num_points)
    torch.testing.assert_close((terms["loss_mask"], terms["loss_dice"]), want)
    assert model.mask_loss(d, _mask_labels((False, False)), maps) is None

    with pytest.raises(ValueError, match=r"sample 1: masks must be \[2, h, w\]"):
        bad = _mask_labels()
        bad[1]["masks"] = torch.zeros(1, 64, 64)
        model(_pixels(), _queries(2, 3), route_mask, labels=bad)
    with pytest.raises(ValueError, match=r"h <= 64, w <= 64"):
        bad = _mask_labels()
        bad[0]["masks"] = torch.zeros(1, 80, 64)
        model(_pixels(), _queries(2, 3), route_mask, labels=bad)


def test_postprocess_masks_crop_the_padding_and_resize_to_the_image():
    """Logits positive on the 3 left columns of a 16 x 16 map (stride 4: 12 of 64 pixels); the image
    fills 32 x 24 of the padded 64 x 64 input, so its left half; at 60 x 50 that is columns 0..24."""
    features = torch.full((1, 1, 16, 16), -10.0)
    features[0, 0, :, :3] = 10.0
    detection = TextDetectionOutput(
        logits=torch.zeros(1, 2, 1), pred_boxes=torch.full((1, 2, 4), 0.5),
        outputs_class=torch.zeros(1, 1, 2, 1), outputs_coord=torch.zeros(1, 1, 2, 4),
        last_hidden_state=torch.zeros(1, 2, 8), encoder_last_hidden_state_vision=torch.zeros(1, 1, 8),
        encoder_last_hidden_state_text=torch.zeros(1, 1, 8), init_reference_points=torch.zeros(1, 2, 4),
        intermediate_reference_points=torch.zeros(1, 1, 2, 4), mask_features=features,
        mask_embeddings=torch.tensor([[[[1.0], [-1.0]]]]), mask_stride=4, input_sizes=[(32, 24)],
        padded_size=(64, 64),
    )  # fmt: skip
    outputs = SuperLinkDetectionOutput(
        logits=torch.tensor([[[2.0], [1.0]]]), pred_boxes=detection.pred_boxes,
        route_mask=torch.tensor([[True]]), detection=detection,
    )  # fmt: skip
    found = SuperLinkGroundingDino.postprocess(outputs, [(60, 50)], threshold=0.5)[0]
    masks = found["masks"]
    assert masks.shape == (2, 60, 50) and masks.dtype == torch.bool
    assert masks[0, :, :24].all() and not masks[0, :, 26:].any()  # the edge pixel is interpolated
    assert not masks[1, :, :24].any() and masks[1, :, 26:].all()  # query 1: the negated mask
    none = SuperLinkGroundingDino.postprocess(outputs, [(60, 50)], threshold=0.99)[0]
    assert none["masks"].shape == (0, 60, 50)


def test_short_overfit_learns_the_square_masks():
    model = _model(seed=0, dropout=0.0, fusion_droppath=0.0, mask_dim=32, mask_num_points=1024).train()
    images, labels = _square_batch()
    for label in labels:
        cx, cy, w, h = (label["boxes"][0] * 64).tolist()
        mask = torch.zeros(1, 64, 64)
        mask[0, round(cy - h / 2) : round(cy + h / 2), round(cx - w / 2) : round(cx + w / 2)] = 1
        label["masks"] = mask
    queries = _queries(2, 1)
    route_mask = torch.ones(2, 1, dtype=torch.bool)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    dice = []
    for _ in range(100):
        out = model(images, queries, route_mask, labels=labels)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        dice.append(out.loss_dict["loss_dice"].item())
    assert sum(dice[-5:]) / 5 < 0.5 * dice[0], (dice[0], dice[-5:])
    model.eval()
    with torch.no_grad():
        out = model(images, queries, route_mask)
    for found, label in zip(model.postprocess(out, [(64, 64), (64, 64)], threshold=0.3), labels):
        mask, target = found["masks"][0], label["masks"][0].bool()
        iou = (mask & target).sum() / (mask | target).sum()
        assert iou > 0.5, float(iou)


def test_mask_stride_of_a_short_wide_input():
    """A short wide input (an 800 x 100 image at detector size 64 is 13 x 106): a 13 x 120 input's
    stride-4 map is 4 x 30 (Swin pads to whole patches), and 13 / 4 rounds to 3. The stride must still
    be 4, or post-processing upsamples to 12 x 90, keeps 90 of the 120 columns and stretches the masks
    across the image."""
    model = _model(mask_dim=32).eval()
    torch.nn.init.normal_(model.gdino.mask_embed[0].layers[-1].weight, std=0.5)
    with torch.no_grad():
        pixels = torch.randn(1, 3, 13, 120, generator=torch.Generator().manual_seed(1))
        out = model(pixels, _queries(1, 2), torch.ones(1, 2, dtype=torch.bool))
    d = out.detection
    assert d.mask_features.shape[-2:] == (4, 30) and d.mask_stride == 4
    # post-processing at the input's own size is the stride-4 upsampling, cut to the input
    logits = out.pred_masks()[:, :3]
    up = torch.nn.functional.interpolate(logits, size=(16, 120), mode="bilinear", align_corners=False)
    want = up[0, :, :13, :120].sigmoid() > 0.5
    assert torch.equal(pixel_masks(d, 0, torch.arange(3), [13, 120]), want)


@pytest.mark.parametrize("two_stage", [True, False])
def test_mask_loss_without_embedding_init_target(two_stage):
    """Decoder targets from the top-k proposals: their masks (``_enc``) come from the proposals
    before the detach, as the official head reads them; one stage has no ``_enc`` terms."""
    model = _model(two_stage=two_stage, embedding_init_target=False, mask_dim=32).train()
    route_mask = torch.tensor([[True, False, False], [True, True, True]])
    out = model(_pixels(), _queries(2, 3), route_mask, labels=_mask_labels())
    assert ("loss_mask_enc" in out.loss_dict) == two_stage
    assert all(torch.isfinite(v) for v in out.loss_dict.values())
    assert (out.detection.encoder_mask_embeddings is not None) == two_stage
    out.loss.backward()
    assert model.gdino.model.mask_embed.layers[-1].weight.grad is not None or not two_stage


# ---------------------------------------------------------------------------- contrastive denoising


def _dn_labels() -> list[dict[str, torch.Tensor]]:
    return [
        {"class_labels": torch.tensor([0]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.4]])},
        {
            "class_labels": torch.tensor([2, 1]),
            "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.2], [0.7, 0.2, 0.1, 0.1]]),
        },
    ]


def test_denoising_queries_put_each_object_in_every_group_with_its_route_and_box():
    model = _model(dn_number=10, dn_label_noise_ratio=0.0, dn_box_noise_scale=0.0).train()
    route_mask = torch.tensor([[True, False, False], [True, True, True]])
    tokens, _, _ = model.text_features(_queries(2, 3), route_mask)
    dn = model.denoising_queries(_dn_labels(), tokens, route_mask)
    # 10 // 2 objects at most = 5 groups of 2 x 2 queries (positives, then negatives)
    assert (dn.groups, dn.group_size, dn.num_queries) == (5, 4, 20)
    assert dn.label_embeds.shape == (2, 20, 32) and dn.box_logits.shape == (2, 20, 4)
    for g in range(5):
        for k in (0, 2):  # positive, negative: without noise the same route and box
            torch.testing.assert_close(dn.label_embeds[0, 4 * g + k], tokens[0, 0])
            torch.testing.assert_close(dn.label_embeds[1, 4 * g + k], tokens[1, 2])
            torch.testing.assert_close(dn.label_embeds[1, 4 * g + k + 1], tokens[1, 1])
            torch.testing.assert_close(
                dn.box_logits[1, 4 * g + k + 1].sigmoid(), torch.tensor([0.7, 0.2, 0.1, 0.1])
            )
            # sample 0 has one object: its second slot of each half is padding (zeros)
            assert (
                dn.label_embeds[0, 4 * g + k + 1].abs().sum() == 0
                and dn.box_logits[0, 4 * g + k + 1].abs().sum() == 0
            )
    assert [p.tolist() for p, _ in dn.indices([1, 2])] == [
        [0, 4, 8, 12, 16],
        [0, 1, 4, 5, 8, 9, 12, 13, 16, 17],
    ]
    assert dn.indices([1, 2])[1][1].tolist() == [0, 1] * 5
    # attention: object queries see no denoising query; a group sees itself and the object queries
    mask = dn.attn_mask
    assert mask.shape == (40, 40) and mask[20:, :20].all() and not mask[20:, 20:].any()
    for g in range(5):
        rows = slice(4 * g, 4 * g + 4)
        assert not mask[rows, 4 * g : 4 * g + 4].any() and not mask[rows, 20:].any()
        assert mask[rows, : 4 * g].all() and mask[rows, 4 * g + 4 : 20].all()
    assert model.denoising_queries([{"class_labels": torch.tensor([]), "boxes": torch.zeros(0, 4)}] * 2,
                                   tokens, route_mask) is None  # fmt: skip
    assert _model().denoising_queries(_dn_labels(), tokens, route_mask) is None  # dn_number 0: none


def test_denoising_noise_moves_negatives_further_than_positives_and_swaps_routes():
    model = _model(dn_number=200, dn_label_noise_ratio=1.0, dn_box_noise_scale=1.0).train()
    route_mask = torch.tensor([[True, True, False], [True, True, True]])
    labels = [{"class_labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}] * 2
    tokens, _, _ = model.text_features(_queries(2, 3), route_mask)
    torch.manual_seed(0)
    dn = model.denoising_queries(labels, tokens, route_mask)
    boxes = dn.box_logits.sigmoid()
    corners = torch.cat([boxes[..., :2] - boxes[..., 2:] / 2, boxes[..., :2] + boxes[..., 2:] / 2], -1)
    shift = (corners - torch.tensor([0.4, 0.4, 0.6, 0.6])).abs()  # half the box's size is 0.1
    positive, negative = shift[:, 0::2], shift[:, 1::2]
    # a negative's corners may cross (x2 < x1), as upstream's: its size is then the logit's floor
    uncrossed = (boxes[:, 1::2, 2:] > 1e-3).all(-1)
    assert positive.max() <= 0.1 + 1e-5 and (boxes[:, 0::2, 2:] > 1e-3).all()
    assert negative[uncrossed].min() >= 0.1 - 1e-5 and negative[uncrossed].max() <= 0.2 + 1e-5
    assert uncrossed.float().mean() > 0.5
    # label noise 1.0: half the queries take a random valid route (sample 0: routes 0-1, never 2)
    same = (dn.label_embeds[0] - tokens[0, 0]).abs().sum(-1) == 0
    other = (dn.label_embeds[0] - tokens[0, 1]).abs().sum(-1) == 0
    assert bool((same | other).all()) and 0.1 < other.float().mean() < 0.4  # ~ 0.5 x 1/2
    picked = [(dn.label_embeds[1] - tokens[1, r]).abs().sum(-1).eq(0).float().mean() for r in range(3)]
    assert picked[2] > 0


def test_object_queries_are_the_same_with_or_without_denoising_queries():
    plain = _model(dropout=0.0, fusion_droppath=0.0, mask_dim=32, auxiliary_loss=True).train()
    torch.nn.init.normal_(plain.gdino.mask_embed[0].layers[-1].weight, std=0.5)
    noisy = _model(dropout=0.0, fusion_droppath=0.0, mask_dim=32, auxiliary_loss=True, dn_number=10).train()
    noisy.load_state_dict(plain.state_dict())
    route_mask = torch.tensor([[True, False, False], [True, True, True]])
    with torch.no_grad():
        a = plain(_pixels(), _queries(2, 3), route_mask, labels=_dn_labels())
        b = noisy(_pixels(), _queries(2, 3), route_mask, labels=_dn_labels())
    assert a.detection.denoising is None and b.detection.denoising is not None
    for field in ("logits", "pred_boxes", "encoder_logits", "encoder_pred_boxes"):
        torch.testing.assert_close(getattr(b, field), getattr(a, field), rtol=1e-5, atol=1e-5)
    for field in ("outputs_class", "outputs_coord", "mask_embeddings", "last_hidden_state",
                  "init_reference_points", "intermediate_reference_points"):  # fmt: skip
        torch.testing.assert_close(
            getattr(b.detection, field), getattr(a.detection, field), rtol=1e-5, atol=1e-5
        )
    for key, value in a.loss_dict.items():  # the matching terms are the same; the _dn ones come on top
        torch.testing.assert_close(b.loss_dict[key], value, rtol=1e-5, atol=1e-5)
    extra = set(b.loss_dict) - set(a.loss_dict)
    assert extra == {f"loss_{t}_dn{s}" for t in ("ce", "bbox", "giou") for s in ("", "_0")}
    assert noisy.config.num_queries == 20  # the decoder's count is restored
    noisy.eval()  # no denoising out of training
    with torch.no_grad():
        c = noisy(_pixels(), _queries(2, 3), route_mask, labels=_dn_labels())
    assert c.detection.denoising is None and not any("_dn" in k for k in c.loss_dict)


def test_denoising_loss_pairs_each_positive_with_its_object():
    model = _model(dn_number=10, dn_label_noise_ratio=0.0, dn_box_noise_scale=0.0, mask_dim=32).train()
    torch.nn.init.normal_(model.gdino.mask_embed[0].layers[-1].weight, std=0.5)
    # the box head starts at zero, so a query would give back its (here exact) box: move it
    torch.nn.init.normal_(model.gdino.bbox_embed[0].layers[-1].weight, std=0.5)
    route_mask = torch.tensor([[True, False, False], [True, True, True]])
    labels = _dn_labels()
    masks = torch.zeros(2, 64, 64)
    masks[0, 20:40, 20:40] = 1
    masks[1, 5:10, 40:50] = 1
    labels[1]["masks"] = masks
    from interleaf.model import grounding_dino

    real, calls = grounding_dino.point_mask_losses, []

    def recorded(pred, target, num_masks, *args):
        calls.append((pred.shape[0], num_masks))
        return real(pred, target, num_masks, *args)

    grounding_dino.point_mask_losses = recorded
    try:
        out = model(_pixels(), _queries(2, 3), route_mask, labels=labels)
    finally:
        grounding_dino.point_mask_losses = real
    # matching: sample 1's 2 matched masks / 2 (last layer, two-stage proposals); denoising: its
    # 2 objects x 5 groups / 10
    assert calls == [(2, 2), (2, 2), (10, 10)]
    dn = out.detection.denoising
    boxes = dn.outputs_coord[-1]
    # L1 over the 3 objects x 5 groups, each positive against its own object, / (3 x 5)
    want = sum((boxes[0, 4 * g] - labels[0]["boxes"][0]).abs().sum()
               + (boxes[1, 4 * g : 4 * g + 2] - labels[1]["boxes"]).abs().sum() for g in range(5)) / 15  # fmt: skip
    assert want > 0.01
    torch.testing.assert_close(out.loss_dict["loss_bbox_dn"], want)
    # the mask terms: sample 1's positives, each against its own object's mask
    assert {"loss_mask_dn", "loss_dice_dn"} <= set(out.loss_dict)
    pred = mask_logits(dn.mask_embeddings[-1][1:2, torch.tensor([0, 1, 4, 5, 8, 9, 12, 13, 16, 17])],
                       out.detection.mask_features[1:2])[0]  # fmt: skip
    torch.manual_seed(7)
    want_mask = real(pred, masks.repeat(5, 1, 1), 10, model.config.mask_num_points)
    torch.manual_seed(7)
    got = model.mask_terms(dn.mask_embeddings[-1], out.detection.mask_features, dn.queries.indices([1, 2]),
                           model.mask_targets(out.detection, labels), 10)  # fmt: skip
    torch.testing.assert_close(got, want_mask)
    out.loss.backward()
    assert model.patch2query.layers[0].weight.grad.abs().sum() > 0
