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
from transformers import GroundingDinoForObjectDetection
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
