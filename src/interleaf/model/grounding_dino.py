"""VisionLLM v2's detection tool: transformers' Grounding DINO driven by "super-link" queries.

In VisionLLM v2 (arXiv 2406.08394) the MLLM writes a routing token ``[DET]`` after each category name,
followed by ``E`` (= ``num_embs``, 4) query tokens. The LLM's last hidden states at those positions
replace Grounding DINO's BERT text features, one "text token" per route::

    queries     [B, R, E, H_llm]   R routes per sample (padded), E query tokens per route
    route_mask  [B, R] bool        True = a real route
      -> patch2query MLP (H_llm -> d -> d -> d, ReLU between), mean over E -> text tokens [B, R, d]
      -> text self-attention mask [B, R, R]: valid routes see every valid route of their sample,
         a padded route sees only itself; text position ids: 0..n_valid-1, 0 for padding
      -> Grounding DINO (vision backbone, encoder with text fusion, two-stage proposals, decoder)
    logits      [B, Q, R]          contrastive score of object query q against route r; class r = route r
    pred_boxes  [B, Q, 4]          normalised (cx, cy, w, h)

``SuperLinkGroundingDino.detect_with_text`` is the part of ``GroundingDinoModel.forward`` +
``GroundingDinoForObjectDetection.forward`` after the text projection, calling the same transformers
submodules in the same order, so given the text features transformers would compute it reproduces
transformers' outputs exactly (checked in the tests).

Departures from the official OV-GDINO of VisionLLM v2 (``OVGroundingDinoForObjectDetection``):

* no mask head (boxes only) and no denoising queries;
* the loss is transformers' ``GroundingDinoForObjectDetectionLoss`` (Hungarian matching, focal
  class loss over route tokens, L1 + GIoU box losses, optional auxiliary and two-stage encoder terms),
  not the official criterion;
* padded route tokens are zeroed before the encoder, so what sits in a padded query slot never
  changes any output (transformers' bi-attention subtracts a batch-wide max, which would otherwise
  let padded values perturb the results at rounding level);
* one-stage configs (``two_stage=False``) are built by ``build_grounding_dino``, since transformers
  5.x fails to initialise them; ``two_stage=True, embedding_init_target=False`` (decoder targets
  gathered from the top-k encoder proposals) and ``two_stage=False, embedding_init_target=False`` run
  here, where transformers' own forward fails.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import BertConfig, GroundingDinoConfig, GroundingDinoForObjectDetection, SwinConfig
from transformers.image_transforms import center_to_corners_format
from transformers.loss.loss_grounding_dino import GroundingDinoForObjectDetectionLoss

__all__ = [
    "PatchToQuery",
    "SuperLinkDetectionOutput",
    "SuperLinkGroundingDino",
    "TextDetectionOutput",
    "build_grounding_dino",
    "tiny_grounding_dino_config",
]


def tiny_grounding_dino_config(**overrides: object) -> GroundingDinoConfig:
    """A Grounding DINO config small enough for CPU tests (a forward on 2x3x64x64 takes milliseconds).

    Tiny Swin backbone (3 output stages + 1 extra conv level), d_model 32, one encoder and two decoder
    layers, 20 object queries, at most 16 text tokens (routes), and a tiny BERT text config (only
    used by the transformers reference model in the tests: ``SuperLinkGroundingDino`` has no text
    encoder). Random init only; nothing is downloaded. ``overrides`` are GroundingDinoConfig fields.
    """
    backbone = SwinConfig(
        image_size=64,
        patch_size=4,
        embed_dim=16,
        depths=[1, 1, 1, 1],
        num_heads=[1, 2, 2, 4],
        window_size=4,
        mlp_ratio=2.0,
        drop_path_rate=0.0,
        out_features=None,
        out_indices=[2, 3, 4],
    )
    # vocab above 1029 so the special token ids Grounding DINO knows ([CLS] 101, [SEP] 102, '.' 1012) exist
    text = BertConfig(
        vocab_size=1030,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
    )
    kwargs: dict[str, object] = {
        "backbone_config": backbone,
        "text_config": text,
        "d_model": 32,  # GroupNorm(32, d_model) in the input projections needs a multiple of 32
        "encoder_layers": 1,
        "decoder_layers": 2,
        "encoder_attention_heads": 4,
        "decoder_attention_heads": 4,
        "encoder_ffn_dim": 64,
        "decoder_ffn_dim": 64,
        "encoder_n_points": 2,
        "decoder_n_points": 2,
        "num_queries": 20,
        "max_text_len": 16,
    }
    kwargs.update(overrides)
    return GroundingDinoConfig(**kwargs)


class PatchToQuery(nn.Module):
    """The official ``patch2query``: Linear(H_llm, d) ReLU Linear(d, d) ReLU Linear(d, d).

    The last layer starts xavier-uniform with zero bias, as in OV-GDINO. Own class (not transformers'
    ``GroundingDinoMLPPredictionHead``, which has the same layout) so that Grounding DINO's
    ``_init_weights`` never zeroes its last layer.
    """

    def __init__(self, in_dim: int, d_model: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            [nn.Linear(in_dim, d_model), nn.Linear(d_model, d_model), nn.Linear(d_model, d_model)]
        )
        nn.init.xavier_uniform_(self.layers[-1].weight)
        nn.init.zeros_(self.layers[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.relu(x)
        return x


@dataclass
class TextDetectionOutput:
    """What ``detect_with_text`` returns: transformers' layout, text axis padded to ``max_text_len``.

    ``logits`` [B, Q, max_text_len] (``-inf`` at masked and beyond-``T`` tokens), ``pred_boxes``
    [B, Q, 4]; ``outputs_class`` [L, B, Q, max_text_len] and ``outputs_coord`` [L, B, Q, 4] per decoder
    layer; ``encoder_logits`` / ``encoder_pred_boxes`` the two-stage top-k proposals (None without two
    stage); ``enc_outputs_class`` / ``enc_outputs_coord_logits`` the per-pixel ones.
    """

    logits: torch.Tensor
    pred_boxes: torch.Tensor
    outputs_class: torch.Tensor
    outputs_coord: torch.Tensor
    last_hidden_state: torch.Tensor
    encoder_last_hidden_state_vision: torch.Tensor
    encoder_last_hidden_state_text: torch.Tensor
    init_reference_points: torch.Tensor
    intermediate_reference_points: torch.Tensor
    encoder_logits: torch.Tensor | None = None
    encoder_pred_boxes: torch.Tensor | None = None
    enc_outputs_class: torch.Tensor | None = None
    enc_outputs_coord_logits: torch.Tensor | None = None


@dataclass
class SuperLinkDetectionOutput:
    """``forward``'s result. ``logits`` [B, Q, R] (``-inf`` at padded routes), ``pred_boxes`` [B, Q, 4]
    normalised cxcywh, ``encoder_logits`` [B, Q, R] (two stage only); ``loss`` / ``loss_dict`` when
    labels were given; ``detection`` the full ``TextDetectionOutput``."""

    logits: torch.Tensor
    pred_boxes: torch.Tensor
    route_mask: torch.Tensor
    detection: TextDetectionOutput
    encoder_logits: torch.Tensor | None = None
    encoder_pred_boxes: torch.Tensor | None = None
    loss: torch.Tensor | None = None
    loss_dict: dict[str, torch.Tensor] | None = None


def build_grounding_dino(config: GroundingDinoConfig) -> GroundingDinoForObjectDetection:
    """transformers' ``GroundingDinoForObjectDetection(config)``, one-stage configs included.

    transformers 5.x cannot build ``two_stage=False``: its ``_init_weights`` zeroes
    ``reference_points.bias``, and that module is an ``nn.Embedding``, without bias. So a one-stage
    detector is built as two-stage (with the learned query embedding), the two-stage heads are
    dropped and ``reference_points`` is added, initialised as transformers means to (xavier-uniform).
    Its forward is transformers' own, unchanged.
    """
    if config.two_stage:
        return GroundingDinoForObjectDetection(config)
    build = copy.deepcopy(config)
    build.two_stage = True
    build.embedding_init_target = True  # one stage always has query_position_embeddings
    detector = GroundingDinoForObjectDetection(build)
    model = detector.model
    for name in ("enc_output", "enc_output_norm", "encoder_output_bbox_embed", "encoder_output_class_embed"):
        delattr(model, name)
    model.reference_points = nn.Embedding(config.num_queries, 4)
    nn.init.xavier_uniform_(model.reference_points.weight)
    # one config object is shared by the model, its encoder and decoder
    detector.config.two_stage = False
    detector.config.embedding_init_target = config.embedding_init_target
    return detector


def _text_free_build_config(config: GroundingDinoConfig) -> GroundingDinoConfig:
    """A copy of ``config`` whose text encoder is as small as BERT allows: ``GroundingDinoModel``
    always builds its text backbone, which we delete straight away, so don't allocate a BERT-base."""
    build = copy.deepcopy(config)
    build.text_config = BertConfig(
        vocab_size=1,
        hidden_size=4,
        num_hidden_layers=1,
        num_attention_heads=1,
        intermediate_size=4,
        max_position_embeddings=1,
    )
    return build


class SuperLinkGroundingDino(nn.Module):
    """Grounding DINO (transformers) whose text features are LLM "super-link" queries.

    ``self.gdino`` is a ``GroundingDinoForObjectDetection`` without ``model.text_backbone`` and
    ``model.text_projection`` (so its state dict has the checkpoint's names minus the text encoder);
    ``self.patch2query`` maps the LLM's hidden size to ``d_model``.
    """

    def __init__(self, config: GroundingDinoConfig, llm_hidden_size: int) -> None:
        super().__init__()
        self.gdino = build_grounding_dino(_text_free_build_config(config))
        # keep the caller's text config on the model's config (what a save would record)
        self.gdino.config.text_config = copy.deepcopy(config.text_config)
        # the text encoder is replaced by patch2query: no BERT weights may exist
        del self.gdino.model.text_backbone
        del self.gdino.model.text_projection
        self.config = self.gdino.config
        self.patch2query = PatchToQuery(llm_hidden_size, config.d_model)

    # ------------------------------------------------------------------ text side

    def text_features(
        self, queries: torch.Tensor, route_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """queries [B, R, E, H_llm], route_mask [B, R] -> (text tokens [B, R, d_model],
        self-attention mask [B, R, R] bool (True = may attend), position ids [B, R])."""
        if queries.dim() != 4:
            raise ValueError(f"queries must be [B, R, E, H], got shape {tuple(queries.shape)}")
        route_mask = route_mask.to(device=queries.device, dtype=torch.bool)
        if route_mask.shape != queries.shape[:2]:
            raise ValueError(
                f"route_mask {tuple(route_mask.shape)} does not match queries' [B, R] {tuple(queries.shape[:2])}"
            )
        weight = self.patch2query.layers[0].weight
        tokens = self.patch2query(queries.to(weight.dtype)).mean(dim=2)
        # padded slots become exact zeros: their content must not reach any output
        tokens = tokens.masked_fill(~route_mask[..., None], 0.0)

        num_routes = route_mask.shape[1]
        eye = torch.eye(num_routes, dtype=torch.bool, device=route_mask.device)
        # valid <-> valid within a sample (the [:n, :n] block when routes come first); padding: itself
        self_attn = (route_mask[:, :, None] & route_mask[:, None, :]) | eye
        position_ids = (route_mask.long().cumsum(dim=1) - 1).clamp(min=0) * route_mask.long()
        return tokens, self_attn, position_ids

    # ------------------------------------------------------------------ Grounding DINO after the text projection

    def detect_with_text(
        self,
        pixel_values: torch.Tensor,
        pixel_mask: torch.Tensor | None,
        text_features: torch.Tensor,
        text_token_mask: torch.Tensor,
        text_self_attention_masks: torch.Tensor,
        text_position_ids: torch.Tensor,
    ) -> TextDetectionOutput:
        """Grounding DINO from the projected text features on, as transformers' forward runs it.

        Masks follow transformers' outer conventions: ``pixel_mask`` [B, h, w] 1 = real pixel;
        ``text_token_mask`` [B, T] True = real token; ``text_self_attention_masks`` [B, T, T] True =
        may attend (as ``generate_masks_with_special_tokens_and_transfer_map`` returns them). The
        inversions each submodule expects are applied here, exactly where transformers applies them.
        """
        model = self.gdino.model
        config = self.gdino.config
        text_token_mask = text_token_mask.bool()
        text_self_attention_masks = text_self_attention_masks.bool()
        if text_self_attention_masks.dim() == 4:  # transformers' [B, 1, T, T] form
            text_self_attention_masks = text_self_attention_masks.squeeze(1)
        if text_features.shape[1] > config.max_text_len:
            # transformers truncates its token sequence; routes cannot be cut, so say so
            raise ValueError(
                f"{text_features.shape[1]} text tokens (routes) exceed config.max_text_len={config.max_text_len}"
            )
        if not bool(text_token_mask.any(dim=1).all()):
            # vision-to-text attention would softmax over nothing (-inf everywhere) and give NaN
            raise ValueError("every sample needs at least one valid text token (route)")

        batch_size, _, height, width = pixel_values.shape
        if pixel_mask is None:
            pixel_mask = torch.ones((batch_size, height, width), dtype=torch.long, device=pixel_values.device)

        # multi-scale backbone features and their masks (True = real pixel)
        vision_features, position_embeddings_list = model.backbone(pixel_values, pixel_mask)
        feature_maps = []
        masks = []
        for level, (source, mask) in enumerate(vision_features):
            feature_maps.append(model.input_proj_vision[level](source))
            masks.append(mask)
        # extra, coarser levels: stride-2 3x3 convs on the last backbone stage
        if config.num_feature_levels > len(feature_maps):
            num_sources = len(feature_maps)
            for level in range(num_sources, config.num_feature_levels):
                if level == num_sources:
                    source = model.input_proj_vision[level](vision_features[-1][0])
                else:
                    source = model.input_proj_vision[level](feature_maps[-1])
                mask = nn.functional.interpolate(pixel_mask[None].float(), size=source.shape[-2:]).to(
                    torch.bool
                )[0]
                pos = model.backbone.position_embedding(source, mask).to(source.dtype)
                feature_maps.append(source)
                masks.append(mask)
                position_embeddings_list.append(pos)

        # decoder targets from the learned embedding (the combination transformers builds it for)
        query_embeds = None
        if config.embedding_init_target or not config.two_stage:
            query_embeds = model.query_position_embeddings.weight

        # flatten the levels
        source_flatten = []
        mask_flatten = []
        lvl_pos_embed_flatten = []
        spatial_shapes_list = []
        for level, (source, mask, pos_embed) in enumerate(zip(feature_maps, masks, position_embeddings_list)):
            spatial_shapes_list.append((source.shape[2], source.shape[3]))
            source_flatten.append(source.flatten(2).transpose(1, 2))
            mask_flatten.append(mask.flatten(1))
            lvl_pos_embed_flatten.append(
                pos_embed.flatten(2).transpose(1, 2) + model.level_embed[level].view(1, 1, -1)
            )
        source_flatten = torch.cat(source_flatten, 1)
        mask_flatten = torch.cat(mask_flatten, 1)
        lvl_pos_embed_flatten = torch.cat(lvl_pos_embed_flatten, 1)
        spatial_shapes = torch.as_tensor(spatial_shapes_list, dtype=torch.long, device=source_flatten.device)
        level_start_index = torch.cat((spatial_shapes.new_zeros((1,)), spatial_shapes.prod(1).cumsum(0)[:-1]))
        valid_ratios = torch.stack([model.get_valid_ratio(m, dtype=source_flatten.dtype) for m in masks], 1)

        # encoder: deformable vision self-attention + vision/text fusion + text enhancer. Its masks are
        # "True = padding" (hence the ~), the text self-attention one included (it inverts it again)
        encoder_outputs = model.encoder(
            vision_features=source_flatten,
            vision_attention_mask=~mask_flatten,
            vision_position_embedding=lvl_pos_embed_flatten,
            spatial_shapes=spatial_shapes,
            spatial_shapes_list=spatial_shapes_list,
            level_start_index=level_start_index,
            valid_ratios=valid_ratios,
            text_features=text_features,
            text_attention_mask=~text_token_mask,
            text_position_embedding=None,
            text_self_attention_masks=~text_self_attention_masks,
            text_position_ids=text_position_ids,
            return_dict=True,
        )
        vision_memory = encoder_outputs.last_hidden_state_vision
        text_memory = encoder_outputs.last_hidden_state_text

        enc_outputs_class = None
        enc_outputs_coord_logits = None
        encoder_logits = None
        encoder_pred_boxes = None
        if config.two_stage:
            # every pixel is a proposal; the num_queries best (max over text tokens) seed the decoder
            object_query_embedding, output_proposals = model.generate_encoder_output_proposals(
                vision_memory, ~mask_flatten, spatial_shapes_list
            )
            enc_outputs_class = model.encoder_output_class_embed(
                object_query_embedding, text_memory, text_token_mask
            )
            enc_outputs_coord_logits = (
                model.encoder_output_bbox_embed(object_query_embedding) + output_proposals
            )
            topk_proposals = torch.topk(enc_outputs_class.max(-1)[0], config.num_queries, dim=1)[1]
            topk_coords_logits = torch.gather(
                enc_outputs_coord_logits, 1, topk_proposals.unsqueeze(-1).repeat(1, 1, 4)
            ).detach()
            reference_points = topk_coords_logits.sigmoid()
            init_reference_points = reference_points
            if query_embeds is not None:
                target = query_embeds.unsqueeze(0).repeat(batch_size, 1, 1)
            else:
                target = torch.gather(
                    object_query_embedding, 1, topk_proposals.unsqueeze(-1).repeat(1, 1, config.d_model)
                ).detach()
            encoder_pred_boxes = reference_points
            # transformers scores these against the text features *before* the encoder; so do we
            encoder_logits = model.encoder_output_class_embed(target, text_features, text_token_mask)
        else:
            target = query_embeds.unsqueeze(0).repeat(batch_size, 1, 1)
            reference_points = model.reference_points.weight.unsqueeze(0).repeat(batch_size, 1, 1).sigmoid()
            init_reference_points = reference_points

        # decoder: its vision mask is "True = real pixel" (no ~), its text mask "True = padding"
        decoder_outputs = model.decoder(
            inputs_embeds=target,
            vision_encoder_hidden_states=vision_memory,
            vision_encoder_attention_mask=mask_flatten,
            text_encoder_hidden_states=text_memory,
            text_encoder_attention_mask=~text_token_mask,
            reference_points=reference_points,
            spatial_shapes=spatial_shapes,
            spatial_shapes_list=spatial_shapes_list,
            level_start_index=level_start_index,
            valid_ratios=valid_ratios,
            self_attn_mask=None,
            return_dict=True,
        )
        hidden_states = decoder_outputs.intermediate_hidden_states
        inter_reference_points = decoder_outputs.intermediate_reference_points

        # per decoder layer: contrastive class logits against the encoded text, box = delta + reference
        outputs_classes = []
        outputs_coords = []
        for level in range(hidden_states.shape[1]):
            reference = init_reference_points if level == 0 else inter_reference_points[:, level - 1]
            reference = torch.special.logit(reference, eps=1e-5)
            outputs_classes.append(
                self.gdino.class_embed[level](
                    vision_hidden_state=hidden_states[:, level],
                    text_hidden_state=text_memory,
                    text_token_mask=text_token_mask,
                )
            )
            delta_bbox = self.gdino.bbox_embed[level](hidden_states[:, level])
            if reference.shape[-1] == 4:
                coord_logits = delta_bbox + reference
            elif reference.shape[-1] == 2:
                delta_bbox[..., :2] += reference
                coord_logits = delta_bbox
            else:
                raise ValueError(f"reference.shape[-1] should be 4 or 2, but got {reference.shape[-1]}")
            outputs_coords.append(coord_logits.sigmoid())
        outputs_class = torch.stack(outputs_classes)
        outputs_coord = torch.stack(outputs_coords)

        return TextDetectionOutput(
            logits=outputs_class[-1],
            pred_boxes=outputs_coord[-1],
            outputs_class=outputs_class,
            outputs_coord=outputs_coord,
            last_hidden_state=decoder_outputs.last_hidden_state,
            encoder_last_hidden_state_vision=vision_memory,
            encoder_last_hidden_state_text=text_memory,
            init_reference_points=init_reference_points,
            intermediate_reference_points=inter_reference_points,
            encoder_logits=encoder_logits,
            encoder_pred_boxes=encoder_pred_boxes,
            enc_outputs_class=enc_outputs_class,
            enc_outputs_coord_logits=enc_outputs_coord_logits,
        )

    # ------------------------------------------------------------------ loss

    def detection_loss(
        self,
        detection: TextDetectionOutput,
        labels: Sequence[dict[str, torch.Tensor]],
        label_maps: Sequence[torch.Tensor],
        text_mask: torch.Tensor,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """transformers' ``GroundingDinoForObjectDetectionLoss`` with the arguments its
        ``GroundingDinoForObjectDetection.forward`` passes (label maps [n_classes_i, max_text_len],
        text_mask [B, Q, max_text_len] bool). Returns (weighted total, the individual terms)."""

        def f32(t: torch.Tensor | None) -> torch.Tensor | None:  # a bf16 model's outputs (no bf16 cdist)
            return None if t is None else t.float()

        loss, loss_dict, _ = GroundingDinoForObjectDetectionLoss(
            f32(detection.logits),
            list(labels),
            detection.logits.device,
            f32(detection.pred_boxes),
            self.gdino.config,
            tuple(label_maps),
            text_mask,
            outputs_class=f32(detection.outputs_class),
            outputs_coord=f32(detection.outputs_coord),
            encoder_logits=f32(detection.encoder_logits),
            encoder_pred_boxes=f32(detection.encoder_pred_boxes),
        )
        return loss, loss_dict

    def route_label_maps(self, route_mask: torch.Tensor, width: int) -> tuple[torch.Tensor, ...]:
        """Class r is text token r: per sample the one-hot map [R, width] (label_map[r, r] = 1).

        Every sample gets all R rows (padded routes' rows are never indexed: labels name valid
        routes) because transformers' criterion offsets sample i's labels by ``len(label_maps[i])``
        rather than by the rows before it; with identical maps the offset lands on an equal row."""
        num_routes = route_mask.shape[1]
        eye = torch.zeros((num_routes, width), dtype=torch.long, device=route_mask.device)
        eye[:, :num_routes] = torch.eye(num_routes, dtype=torch.long, device=route_mask.device)
        return tuple(eye for _ in range(route_mask.shape[0]))

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        pixel_values: torch.Tensor,
        queries: torch.Tensor,
        route_mask: torch.Tensor,
        pixel_mask: torch.Tensor | None = None,
        labels: Sequence[dict[str, torch.Tensor]] | None = None,
    ) -> SuperLinkDetectionOutput:
        """pixel_values [B, 3, h, w], queries [B, R, E, H_llm], route_mask [B, R] bool, pixel_mask
        [B, h, w] (1 = real pixel), labels: per sample ``class_labels`` (route indices) and ``boxes``
        [n, 4] normalised cxcywh."""
        route_mask = route_mask.to(device=queries.device, dtype=torch.bool)
        tokens, self_attn, position_ids = self.text_features(queries, route_mask)
        pixel_values = pixel_values.to(tokens.dtype)  # the detector's dtype (float32 pixels, bf16 model)
        detection = self.detect_with_text(
            pixel_values, pixel_mask, tokens, route_mask, self_attn, position_ids
        )

        loss = loss_dict = None
        if labels is not None:
            if len(labels) != route_mask.shape[0]:
                raise ValueError(f"{len(labels)} label dicts for a batch of {route_mask.shape[0]}")
            num_valid = route_mask.sum(dim=1)
            for i, target in enumerate(labels):
                classes = target["class_labels"]
                if classes.numel() and (int(classes.min()) < 0 or int(classes.max()) >= int(num_valid[i])):
                    raise ValueError(
                        f"sample {i}: class_labels {classes.tolist()} outside its {int(num_valid[i])} valid routes"
                    )
            width = detection.logits.shape[-1]
            label_maps = self.route_label_maps(route_mask, width)
            # as transformers' build_text_mask: [B, Q, width], True at real text tokens (routes)
            text_mask = torch.zeros_like(detection.logits, dtype=torch.bool)
            text_mask[:, :, : route_mask.shape[1]] = route_mask[:, None, :]
            loss, loss_dict = self.detection_loss(detection, labels, label_maps, text_mask)

        num_routes = route_mask.shape[1]
        encoder_logits = detection.encoder_logits
        return SuperLinkDetectionOutput(
            logits=detection.logits[..., :num_routes],
            pred_boxes=detection.pred_boxes,
            route_mask=route_mask,
            detection=detection,
            encoder_logits=None if encoder_logits is None else encoder_logits[..., :num_routes],
            encoder_pred_boxes=detection.encoder_pred_boxes,
            loss=loss,
            loss_dict=loss_dict,
        )

    # ------------------------------------------------------------------ post-processing

    @staticmethod
    def postprocess(
        outputs: SuperLinkDetectionOutput,
        target_sizes: torch.Tensor | Sequence[tuple[int, int]],
        threshold: float = 0.3,
    ) -> list[dict[str, torch.Tensor]]:
        """Per sample: each object query's best valid route (max sigmoid score), kept above
        ``threshold``, sorted by score. ``target_sizes`` [(height, width)] per sample. Returns
        ``{"scores" [n], "routes" [n] long, "boxes" [n, 4] xyxy in pixels}`` (not clipped, as
        transformers' post-processing)."""
        logits = outputs.logits.float()  # a bf16 model's boxes would be scaled to pixels in bf16
        probs = logits.sigmoid().masked_fill(~outputs.route_mask[:, None, :], 0.0)
        scores, routes = probs.max(dim=-1)
        xyxy = center_to_corners_format(outputs.pred_boxes.float())
        sizes = torch.as_tensor(target_sizes, dtype=xyxy.dtype, device=xyxy.device)
        if sizes.shape != (logits.shape[0], 2):
            raise ValueError(
                f"target_sizes must be [(height, width)] per sample, got shape {tuple(sizes.shape)}"
            )
        scale = torch.stack([sizes[:, 1], sizes[:, 0], sizes[:, 1], sizes[:, 0]], dim=-1)
        xyxy = xyxy * scale[:, None, :]

        results = []
        for b in range(logits.shape[0]):
            keep = scores[b] > threshold
            order = scores[b][keep].argsort(descending=True)
            results.append(
                {
                    "scores": scores[b][keep][order],
                    "routes": routes[b][keep][order],
                    "boxes": xyxy[b][keep][order],
                }
            )
        return results
