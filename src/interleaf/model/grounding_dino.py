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

* denoising label noise picks among the sample's valid routes (upstream draws from all text slots,
  padding included);
* the class and box loss is transformers' ``GroundingDinoForObjectDetectionLoss`` (Hungarian
  matching, focal class loss over route tokens, L1 + GIoU box losses, optional auxiliary and
  two-stage encoder terms), not the official criterion;
* padded route tokens are zeroed before the encoder, so what sits in a padded query slot never
  changes any output (transformers' bi-attention subtracts a batch-wide max, which would otherwise
  let padded values perturb the results at rounding level);
* one-stage configs (``two_stage=False``) are built by ``build_grounding_dino``, since transformers
  5.x fails to initialise them; ``two_stage=True, embedding_init_target=False`` (decoder targets
  gathered from the top-k encoder proposals) and ``two_stage=False, embedding_init_target=False`` run
  here, where transformers' own forward fails.

**Masks** (the ``[SEG]`` route), with ``config.mask_dim`` > 0, as the official mask head
(Mask DINO's, ``modeling_ov_grounding_dino_mask_dn.py``): the backbone's finest output level (stride
4 for Swin with ``out_indices`` from 1) feeds only the masks, the others the transformer as before::

    finest backbone map --lateral_convs[0] (1x1 conv + GN)--+ bilinear(encoder memory, level 0)
        --output_convs[0] (3x3 conv + GN + ReLU)--mask_features (1x1 conv)--> F [B, mask_dim, h, w]
    decoder layer l: mask_embed[l](hidden [B, Q, d]) -> E [B, Q, mask_dim]  (one MLP for all layers)
    mask logits [B, Q, h, w] = E . F  (einsum over mask_dim)

trained with Mask2Former's loss on the Hungarian pairs of the box matching (the official matcher's
mask costs are commented out): sigmoid cross-entropy + dice on 12,544 points sampled by uncertainty,
weights ``mask_weight`` / ``dice_weight`` (5 and 5, as VisionLLM v2 trains), on every decoder layer
with ``auxiliary_loss`` and on the two-stage proposals (``model.mask_embed``). Post-processing
upsamples a kept query's logits by the stride, crops the padding, resizes to the image and keeps
``sigmoid > 0.5``, as the official ``post_process_instseg_gdino``.

**Contrastive denoising** (DINO's CDN, the official ``prepare_for_cdn``), in training with
``config.dn_number`` > 0 (upstream: 100; default 0, as transformers' Grounding DINO has none): each
ground-truth object enters the decoder again in ``dn_number // max objects`` groups, as a positive
query (its route's text token, its box a little noised) to reconstruct and a negative (box noised
more) to call background, in front of the object queries, which cannot see them. Their terms (focal
class, L1 + GIoU box, mask) use fixed pairs and come on top (``_dn``, ``_dn_i``); the object
queries' outputs are what they would be without them.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig, GroundingDinoConfig, GroundingDinoForObjectDetection, SwinConfig
from transformers.image_transforms import center_to_corners_format
from transformers.loss.loss_grounding_dino import (
    GroundingDinoForObjectDetectionLoss,
    GroundingDinoHungarianMatcher,
    GroundingDinoImageLoss,
)
from transformers.models.grounding_dino.modeling_grounding_dino import GroundingDinoMLPPredictionHead
from transformers.models.mask2former.modeling_mask2former import (
    dice_loss,
    sample_point,
    sigmoid_cross_entropy_loss,
)

__all__ = [
    "PatchToQuery",
    "SuperLinkDetectionOutput",
    "SuperLinkGroundingDino",
    "TextDetectionOutput",
    "build_grounding_dino",
    "image_sizes",
    "pixel_masks",
    "point_mask_losses",
    "tiny_grounding_dino_config",
]

# the mask settings VisionLLM v2 trains with (train.py sets them on the Grounding DINO config) and
# Mask2Former's point sampling; a config may override each
MASK_DEFAULTS = {
    "mask_weight": 5.0,
    "dice_weight": 5.0,
    "mask_num_points": 112 * 112,
    "mask_oversample_ratio": 3.0,
    "mask_importance_sample_ratio": 0.75,
}
CLASS_LOSS_WEIGHT = 2.0  # transformers' GroundingDinoForObjectDetectionLoss weighs loss_ce so, fixed
# contrastive denoising (DINO's CDN) in training: off unless the config sets dn_number (the official
# OV-GDINO uses 100 groups' worth of queries, label noise 0.5, box noise 1.0)
DENOISING_DEFAULTS = {"dn_number": 0, "dn_label_noise_ratio": 0.5, "dn_box_noise_scale": 1.0}


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
        out_indices=[1, 2, 3, 4] if overrides.get("mask_dim") else [2, 3, 4],
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
class DenoisingQueries:
    """Contrastive denoising queries (DINO's CDN, as the official OV-GDINO's ``prepare_for_cdn``
    builds them) put before the object queries in training. ``groups`` groups of ``group_size`` =
    2 x (most objects of a sample) queries: in group g, object j of a sample is query
    ``g * group_size + j`` with a slightly noised box (positive: to be reconstructed) and query
    ``g * group_size + group_size / 2 + j`` with a more noised one (negative: background); padding
    queries are zeros. ``label_embeds`` [B, P, d] are the text tokens (routes) of the objects'
    classes, some swapped for a random route; ``box_logits`` [B, P, 4] inverse-sigmoid cxcywh;
    ``attn_mask`` [P + Q, P + Q] True where a query may not attend: the object queries see no
    denoising query, a group sees no other group (it does see the object queries)."""

    label_embeds: torch.Tensor
    box_logits: torch.Tensor
    attn_mask: torch.Tensor
    groups: int
    group_size: int

    @property
    def num_queries(self) -> int:
        return self.groups * self.group_size

    def indices(self, counts: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The positive (query, object) pairs per sample with ``counts`` objects."""
        device = self.label_embeds.device
        pairs = []
        for n in counts:
            objects = torch.arange(n, device=device)
            starts = torch.arange(self.groups, device=device)[:, None] * self.group_size
            pairs.append(((starts + objects).flatten(), objects.repeat(self.groups)))
        return pairs


@dataclass
class DenoisingOutput:
    """The denoising queries' outputs, per decoder layer: ``outputs_class`` [L, B, P, max_text_len],
    ``outputs_coord`` [L, B, P, 4], ``mask_embeddings`` [L, B, P, mask_dim] (with a mask head)."""

    queries: DenoisingQueries
    outputs_class: torch.Tensor
    outputs_coord: torch.Tensor
    mask_embeddings: torch.Tensor | None = None


@dataclass
class TextDetectionOutput:
    """What ``detect_with_text`` returns: transformers' layout, text axis padded to ``max_text_len``.

    ``logits`` [B, Q, max_text_len] (``-inf`` at masked and beyond-``T`` tokens), ``pred_boxes``
    [B, Q, 4]; ``outputs_class`` [L, B, Q, max_text_len] and ``outputs_coord`` [L, B, Q, 4] per decoder
    layer; ``encoder_logits`` / ``encoder_pred_boxes`` the two-stage top-k proposals (None without two
    stage); ``enc_outputs_class`` / ``enc_outputs_coord_logits`` the per-pixel ones.

    With a mask head: ``mask_features`` [B, mask_dim, h, w] (stride ``mask_stride`` to the padded
    input), ``mask_embeddings`` [L, B, Q, mask_dim] per decoder layer, ``encoder_mask_embeddings``
    [B, Q, mask_dim] of the two-stage proposals; mask logits are their products (:func:`mask_logits`).
    ``input_sizes``: each image's (height, width) inside the padded input of ``padded_size``.
    ``denoising``: the denoising queries' outputs, when there were some (training); every other
    field is the object queries' alone.
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
    mask_features: torch.Tensor | None = None
    mask_embeddings: torch.Tensor | None = None
    encoder_mask_embeddings: torch.Tensor | None = None
    mask_stride: int | None = None
    input_sizes: list[tuple[int, int]] | None = None
    padded_size: tuple[int, int] | None = None
    denoising: DenoisingOutput | None = None


def image_sizes(pixel_mask: torch.Tensor) -> list[tuple[int, int]]:
    """Each image's (height, width) inside a padded batch: the rows and columns of its real pixels
    (``pixel_mask`` [B, h, w], 1 = real; images sit top-left, as the image processor pads them)."""
    real = pixel_mask.bool()
    return list(zip(real.any(dim=2).sum(dim=1).tolist(), real.any(dim=1).sum(dim=1).tolist()))


def mask_logits(embeddings: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """Mask logits of queries: embeddings [B, Q, C] . features [B, C, h, w] -> [B, Q, h, w]."""
    return torch.einsum("bqc,bchw->bqhw", embeddings, features)


@dataclass
class SuperLinkDetectionOutput:
    """``forward``'s result. ``logits`` [B, Q, R] (``-inf`` at padded routes), ``pred_boxes`` [B, Q, 4]
    normalised cxcywh, ``encoder_logits`` [B, Q, R] (two stage only); ``loss`` / ``loss_dict`` when
    labels were given; ``detection`` the full ``TextDetectionOutput`` (its mask embeddings and
    features, with a mask head; ``pred_masks()`` multiplies out the last layer's)."""

    logits: torch.Tensor
    pred_boxes: torch.Tensor
    route_mask: torch.Tensor
    detection: TextDetectionOutput
    encoder_logits: torch.Tensor | None = None
    encoder_pred_boxes: torch.Tensor | None = None
    loss: torch.Tensor | None = None
    loss_dict: dict[str, torch.Tensor] | None = None

    def pred_masks(self) -> torch.Tensor | None:
        """The last decoder layer's mask logits [B, Q, h, w] (None without a mask head)."""
        d = self.detection
        return None if d.mask_features is None else mask_logits(d.mask_embeddings[-1], d.mask_features)


class ConvNorm(nn.Conv2d):
    """detectron2's ``Conv2d`` with ``norm="GN"`` as the official pixel decoder builds it: a conv
    without bias, GroupNorm(32) (``norm``), then ReLU if asked (names ``weight``, ``norm.*``)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, relu: bool = False) -> None:
        super().__init__(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)
        self.norm = nn.GroupNorm(32, out_channels)
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(super().forward(x))
        return torch.relu(x) if self.relu else x


def point_mask_losses(
    pred: torch.Tensor,
    target: torch.Tensor,
    num_masks: float,
    num_points: int = MASK_DEFAULTS["mask_num_points"],
    oversample_ratio: float = MASK_DEFAULTS["mask_oversample_ratio"],
    importance_sample_ratio: float = MASK_DEFAULTS["mask_importance_sample_ratio"],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask2Former's mask losses (the official OV-GDINO's ``loss_masks``): pred [n, h, w] logits and
    target [n, H, W] in {0, 1} over the same (padded) frame, compared at ``num_points`` points per
    mask in [0, 1]^2: ``importance_sample_ratio`` of them the most uncertain (|logit| smallest) of
    ``oversample_ratio`` x as many random ones, the rest random. Returns (sigmoid cross-entropy,
    dice), each summed over masks and divided by ``num_masks``. Draws from the global RNG."""
    pred, target = pred[:, None], target[:, None].to(pred.dtype)
    n = pred.shape[0]
    with torch.no_grad():
        sampled = int(num_points * oversample_ratio)
        coords = torch.rand(n, sampled, 2, device=pred.device)
        uncertainty = -sample_point(pred, coords, align_corners=False).abs()
        num_uncertain = int(importance_sample_ratio * num_points)
        idx = torch.topk(uncertainty[:, 0, :], k=num_uncertain, dim=1)[1]
        idx = idx + sampled * torch.arange(n, device=pred.device)[:, None]
        coords = coords.view(-1, 2)[idx.view(-1), :].view(n, num_uncertain, 2)
        if num_points > num_uncertain:
            coords = torch.cat(
                [coords, torch.rand(n, num_points - num_uncertain, 2, device=pred.device)], dim=1
            )
        labels = sample_point(target, coords, align_corners=False).squeeze(1)
    logits = sample_point(pred, coords, align_corners=False).squeeze(1)
    return sigmoid_cross_entropy_loss(logits, labels, num_masks), dice_loss(logits, labels, num_masks)


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
    ``self.patch2query`` maps the LLM's hidden size to ``d_model``. ``config.mask_dim`` > 0 adds the
    official mask head (module docstring): ``model.lateral_convs``, ``model.output_convs``,
    ``model.mask_features``, ``model.mask_embed`` (two-stage proposals) and ``mask_embed`` (decoder).
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
        self.mask_dim = int(getattr(config, "mask_dim", 0) or 0)
        if self.mask_dim:
            for key, value in MASK_DEFAULTS.items():
                if not hasattr(self.config, key):
                    setattr(self.config, key, value)
            self._add_mask_head()

    def _add_mask_head(self) -> None:
        """The official mask head. The finest backbone level is the pixel decoder's alone, so the
        transformer's input projections are rebuilt (as transformers builds them) for the others."""
        model, config, d = self.gdino.model, self.gdino.config, self.gdino.config.d_model
        channels = list(model.backbone.conv_encoder.intermediate_channel_sizes)
        if len(channels) < 2 or config.num_feature_levels < 2:
            raise ValueError(
                "mask_dim needs a backbone with at least two output levels (the finest is the masks') "
                f"and num_feature_levels >= 2; got {len(channels)} backbone levels, "
                f"num_feature_levels={config.num_feature_levels}"
            )
        projections = [
            nn.Sequential(nn.Conv2d(c, d, kernel_size=1), nn.GroupNorm(32, d)) for c in channels[1:]
        ]
        in_channels = channels[-1]
        for _ in range(config.num_feature_levels - len(projections)):
            projections.append(
                nn.Sequential(
                    nn.Conv2d(in_channels, d, kernel_size=3, stride=2, padding=1), nn.GroupNorm(32, d)
                )
            )
            in_channels = d
        model.input_proj_vision = nn.ModuleList(projections)
        model.lateral_convs = nn.ModuleList([ConvNorm(channels[0], d, 1)])
        model.output_convs = nn.ModuleList([ConvNorm(d, d, 3, relu=True)])
        model.mask_features = nn.Conv2d(d, self.mask_dim, kernel_size=1)
        model.mask_embed = GroundingDinoMLPPredictionHead(d, d, self.mask_dim, 3)
        head = GroundingDinoMLPPredictionHead(d, d, self.mask_dim, 3)
        self.gdino.mask_embed = nn.ModuleList([head for _ in range(config.decoder_layers)])
        new = [model.input_proj_vision, model.lateral_convs, model.output_convs, model.mask_features,
               model.mask_embed, self.gdino.mask_embed]  # fmt: skip
        # transformers' init, as for the rest of the detector; for the mask modules it is what the
        # official head starts from when VisionLLM v2 loads a pretrained Grounding DINO without them
        # (the mask MLPs' last layers at zero)
        for module in new:
            module.apply(self.gdino._init_weights)  # children first, as a model's own init runs

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

    def denoising_setting(self, key: str) -> float:
        """A denoising setting: the config's, else :data:`DENOISING_DEFAULTS`'."""
        return getattr(self.config, key, DENOISING_DEFAULTS[key])

    def denoising_queries(
        self, labels: Sequence[dict[str, torch.Tensor]], tokens: torch.Tensor, route_mask: torch.Tensor
    ) -> DenoisingQueries | None:
        """The training batch's denoising queries (:class:`DenoisingQueries`) from its ``labels`` and
        text tokens [B, R, d]; None when ``dn_number`` is 0 or no sample has an object. Noise as the
        official ``prepare_for_cdn``: with probability ``dn_label_noise_ratio / 2`` a query's class is
        a random one (here: a random valid route of its sample, as padded routes are no class); each
        box corner moves by up to ``dn_box_noise_scale`` x half the box's size, by 1 to 2 x that for
        negatives, clamped to the image. Draws from the global RNG."""
        dn_number = int(self.denoising_setting("dn_number"))
        counts = [len(t["class_labels"]) for t in labels]
        most = max(counts, default=0)
        if dn_number <= 0 or most == 0:
            return None
        groups = max(dn_number // most, 1)
        size = 2 * most
        batch, _, d = tokens.shape
        total = groups * size
        device = tokens.device
        label_embeds = tokens.new_zeros(batch, total, d)
        box_logits = tokens.new_zeros(batch, total, 4)
        label_noise = float(self.denoising_setting("dn_label_noise_ratio"))
        box_noise = float(self.denoising_setting("dn_box_noise_scale"))
        valid = route_mask.sum(dim=1)
        for b, target in enumerate(labels):
            n = counts[b]
            if n == 0:
                continue
            # repetition k of the sample's objects: group k // 2, positive for even k, negative for odd
            repeats = torch.arange(2 * groups, device=device)
            classes = target["class_labels"].to(device).repeat(2 * groups)
            if label_noise > 0:
                swap = torch.rand(classes.shape, device=device) < label_noise * 0.5
                classes = torch.where(swap, torch.randint_like(classes, 0, int(valid[b])), classes)
            boxes = target["boxes"].to(device=device, dtype=torch.float32).repeat(2 * groups, 1)
            if box_noise > 0:
                corners = center_to_corners_format(boxes)
                half = boxes[:, 2:].repeat(1, 2) / 2
                sign = torch.randint_like(boxes, 0, 2) * 2.0 - 1.0
                part = torch.rand_like(boxes)
                part[repeats.repeat_interleave(n) % 2 == 1] += 1.0  # negatives: further off
                corners = (corners + part * sign * half * box_noise).clamp(0.0, 1.0)
                boxes = torch.cat(
                    [(corners[:, :2] + corners[:, 2:]) / 2, corners[:, 2:] - corners[:, :2]], dim=1
                )
            slots = (repeats[:, None] * most + torch.arange(n, device=device)).flatten()
            label_embeds[b, slots] = tokens[b, classes]
            box_logits[b, slots] = torch.special.logit(boxes, eps=1e-5).to(box_logits.dtype)
        size_all = total + self.config.num_queries
        attn_mask = torch.zeros(size_all, size_all, dtype=torch.bool, device=device)
        attn_mask[total:, :total] = True  # the object queries must not see the answers
        for g in range(groups):
            rows = slice(g * size, (g + 1) * size)
            attn_mask[rows, (g + 1) * size : total] = True
            attn_mask[rows, : g * size] = True
        return DenoisingQueries(label_embeds, box_logits, attn_mask, groups, size)

    # ------------------------------------------------------------------ Grounding DINO after the text projection

    def detect_with_text(
        self,
        pixel_values: torch.Tensor,
        pixel_mask: torch.Tensor | None,
        text_features: torch.Tensor,
        text_token_mask: torch.Tensor,
        text_self_attention_masks: torch.Tensor,
        text_position_ids: torch.Tensor,
        denoising: DenoisingQueries | None = None,
    ) -> TextDetectionOutput:
        """Grounding DINO from the projected text features on, as transformers' forward runs it.

        Masks follow transformers' outer conventions: ``pixel_mask`` [B, h, w] 1 = real pixel;
        ``text_token_mask`` [B, T] True = real token; ``text_self_attention_masks`` [B, T, T] True =
        may attend (as ``generate_masks_with_special_tokens_and_transfer_map`` returns them). The
        inversions each submodule expects are applied here, exactly where transformers applies them.
        ``denoising`` queries (training) go before the object queries, as the official OV-GDINO puts
        them; their outputs come back apart (``denoising``).
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
        finest = None
        if self.mask_dim:  # the finest level is the pixel decoder's alone
            finest = vision_features[0][0]
            vision_features, position_embeddings_list = vision_features[1:], position_embeddings_list[1:]
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
        mask_features = None
        if finest is not None:
            # the encoder's finest level, upsampled onto the finest backbone map (official pixel decoder)
            h0, w0 = spatial_shapes_list[0]
            level0 = vision_memory[:, : h0 * w0].transpose(1, 2).reshape(batch_size, -1, h0, w0)
            lateral = model.lateral_convs[0](finest)
            up = F.interpolate(level0.float(), size=lateral.shape[-2:], mode="bilinear", align_corners=False)
            mask_features = model.mask_features(model.output_convs[0](lateral + up.to(lateral.dtype)))

        enc_outputs_class = None
        enc_outputs_coord_logits = None
        encoder_logits = None
        encoder_pred_boxes = None
        encoder_mask_embeddings = None
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
                target = proposals = query_embeds.unsqueeze(0).repeat(batch_size, 1, 1)
            else:
                proposals = torch.gather(
                    object_query_embedding, 1, topk_proposals.unsqueeze(-1).repeat(1, 1, config.d_model)
                )
                target = proposals.detach()
            if mask_features is not None:  # the official head reads the proposals before the detach
                encoder_mask_embeddings = model.mask_embed(proposals)
            encoder_pred_boxes = reference_points
            # transformers scores these against the text features *before* the encoder; so do we
            encoder_logits = model.encoder_output_class_embed(target, text_features, text_token_mask)
        else:
            target = query_embeds.unsqueeze(0).repeat(batch_size, 1, 1)
            reference_points = model.reference_points.weight.unsqueeze(0).repeat(batch_size, 1, 1).sigmoid()
            init_reference_points = reference_points

        self_attn_mask = None
        num_denoising = 0
        if denoising is not None:
            num_denoising = denoising.num_queries
            target = torch.cat([denoising.label_embeds.to(target.dtype), target], dim=1)
            reference_points = torch.cat(
                [denoising.box_logits.sigmoid().to(reference_points.dtype), reference_points], dim=1
            )
            init_reference_points = reference_points
            # additive, as transformers' decoder self-attention adds it to the scores
            self_attn_mask = torch.zeros(denoising.attn_mask.shape, dtype=target.dtype, device=target.device)
            self_attn_mask = self_attn_mask.masked_fill(denoising.attn_mask, torch.finfo(target.dtype).min)[
                None, None
            ]

        # decoder: its vision mask is "True = real pixel" (no ~), its text mask "True = padding".
        # It shapes that text mask for config.num_queries rows, so while denoising queries ride
        # along the config (shared by the whole detector) counts them too
        num_queries = config.num_queries
        config.num_queries = num_queries + num_denoising
        try:
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
                self_attn_mask=self_attn_mask,
                return_dict=True,
            )
        finally:
            config.num_queries = num_queries
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
        mask_embeddings = mask_stride = input_sizes = None
        if mask_features is not None:
            mask_embeddings = torch.stack(
                [
                    self.gdino.mask_embed[level](hidden_states[:, level])
                    for level in range(hidden_states.shape[1])
                ]
            )
        last_hidden_state = decoder_outputs.last_hidden_state
        denoising_output = None
        if denoising is not None:  # the denoising queries' outputs apart; the rest as without them
            k = num_denoising
            denoising_output = DenoisingOutput(
                denoising, outputs_class[:, :, :k], outputs_coord[:, :, :k],
                None if mask_embeddings is None else mask_embeddings[:, :, :k],
            )  # fmt: skip
            outputs_class, outputs_coord = outputs_class[:, :, k:], outputs_coord[:, :, k:]
            mask_embeddings = None if mask_embeddings is None else mask_embeddings[:, :, k:]
            last_hidden_state = last_hidden_state[:, k:]
            init_reference_points = init_reference_points[:, k:]
            inter_reference_points = inter_reference_points[:, :, k:]
        if mask_features is not None:
            # Swin pads to whole patches, so a side of ceil(L / stride) can round L / side below the
            # stride on a short side (13 / 4 -> 3); it never rounds above, so take the larger side's
            mask_stride = max(round(height / finest.shape[-2]), round(width / finest.shape[-1]))
            input_sizes = image_sizes(pixel_mask)

        return TextDetectionOutput(
            logits=outputs_class[-1],
            pred_boxes=outputs_coord[-1],
            outputs_class=outputs_class,
            outputs_coord=outputs_coord,
            last_hidden_state=last_hidden_state,
            encoder_last_hidden_state_vision=vision_memory,
            encoder_last_hidden_state_text=text_memory,
            init_reference_points=init_reference_points,
            intermediate_reference_points=inter_reference_points,
            encoder_logits=encoder_logits,
            encoder_pred_boxes=encoder_pred_boxes,
            enc_outputs_class=enc_outputs_class,
            enc_outputs_coord_logits=enc_outputs_coord_logits,
            mask_features=mask_features,
            mask_embeddings=mask_embeddings,
            encoder_mask_embeddings=encoder_mask_embeddings,
            mask_stride=mask_stride,
            input_sizes=input_sizes,
            padded_size=(height, width) if mask_features is not None else None,
            denoising=denoising_output,
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

    def mask_targets(
        self, detection: TextDetectionOutput, labels: Sequence[dict[str, torch.Tensor]]
    ) -> dict[int, torch.Tensor]:
        """The samples whose labels hold ``masks`` [n, h, w] (their objects', in {0, 1}, over the
        image's part of the padded input: top-left, at most ``padded_size``), each padded to the
        input: {sample: [n, H, W]}. Empty without a mask head."""
        if detection.mask_features is None:
            return {}
        height, width = detection.padded_size
        targets = {}
        for i, target in enumerate(labels):
            masks = target.get("masks")
            if masks is None:
                continue
            n = len(target["class_labels"])
            if masks.dim() != 3 or masks.shape[0] != n or masks.shape[1] > height or masks.shape[2] > width:
                raise ValueError(
                    f"sample {i}: masks must be [{n}, h, w] with h <= {height}, w <= {width} (the padded "
                    f"input), got shape {tuple(masks.shape)}"
                )
            targets[i] = F.pad(masks.float(), (0, width - masks.shape[2], 0, height - masks.shape[1]))
        return targets

    def mask_terms(
        self,
        embeddings: torch.Tensor,
        features: torch.Tensor,
        indices: Sequence[tuple[torch.Tensor, torch.Tensor]],
        targets: dict[int, torch.Tensor],
        num_masks: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss_mask, loss_dice) of the (query, object) pairs ``indices`` of the samples in
        ``targets``: query masks ``embeddings`` [B, Q, C] . ``features`` [B, C, h, w] against the
        objects' masks, by :func:`point_mask_losses` with the config's point sampling."""
        config = self.config
        chosen = sorted(targets)
        pred = torch.cat(
            [
                mask_logits(embeddings[i : i + 1, indices[i][0]].float(), features[i : i + 1].float())[0]
                for i in chosen
            ]
        )
        target = torch.cat([targets[i][indices[i][1]] for i in chosen])
        return point_mask_losses(
            pred, target, num_masks, config.mask_num_points, config.mask_oversample_ratio,
            config.mask_importance_sample_ratio,
        )  # fmt: skip

    def mask_loss(
        self,
        detection: TextDetectionOutput,
        labels: Sequence[dict[str, torch.Tensor]],
        label_maps: Sequence[torch.Tensor],
        targets: dict[int, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]] | None:
        """The mask terms, for the samples whose labels hold masks (``targets``, as
        :meth:`mask_targets` gives them; computed when not given); None when none does. Pairs are the box matching's (transformers' matcher with the config's costs, as
        the box loss matches), per output: the last decoder layer, every other one with
        ``auxiliary_loss`` (suffix ``_i``), the two-stage proposals (``_enc``). Each output adds
        ``mask_weight * loss_mask + dice_weight * loss_dice``, normalised by the number of masks."""
        config = self.config
        if targets is None:
            targets = self.mask_targets(detection, labels)
        if not targets:
            return None
        num_masks = max(sum(len(labels[i]["class_labels"]) for i in targets), 1)
        layers = detection.outputs_class.shape[0]
        outputs = [("", detection.logits, detection.pred_boxes, detection.mask_embeddings[-1])]
        if config.auxiliary_loss:
            outputs += [(f"_{i}", detection.outputs_class[i], detection.outputs_coord[i],
                         detection.mask_embeddings[i]) for i in range(layers - 1)]  # fmt: skip
        if config.two_stage:
            outputs.append(("_enc", detection.encoder_logits, detection.encoder_pred_boxes,
                            detection.encoder_mask_embeddings))  # fmt: skip
        matcher = GroundingDinoHungarianMatcher(
            class_cost=config.class_cost, bbox_cost=config.bbox_cost, giou_cost=config.giou_cost
        )
        total = detection.mask_features.new_zeros((), dtype=torch.float32)
        loss_dict = {}
        for suffix, logits, boxes, embeddings in outputs:
            indices = matcher(
                {"logits": logits.float(), "pred_boxes": boxes.float(), "label_maps": tuple(label_maps)},
                list(labels),
            )
            loss_mask, loss_dice = self.mask_terms(
                embeddings, detection.mask_features, indices, targets, num_masks
            )
            loss_dict[f"loss_mask{suffix}"] = loss_mask
            loss_dict[f"loss_dice{suffix}"] = loss_dice
            total = total + config.mask_weight * loss_mask + config.dice_weight * loss_dice
        return total, loss_dict

    def denoising_loss(
        self,
        detection: TextDetectionOutput,
        labels: Sequence[dict[str, torch.Tensor]],
        label_maps: Sequence[torch.Tensor],
        route_mask: torch.Tensor,
        targets: dict[int, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]] | None:
        """The denoising queries' terms (None without them): each positive query reconstructs its
        object (pairs fixed, no matching), negatives and padding are background. transformers'
        focal class loss and L1 + GIoU box losses (weights as its detection loss), and the mask terms
        for samples with masks (``targets`` as in :meth:`mask_loss`), each normalised by objects x groups as the official criterion; for
        the last decoder layer (``_dn``) and, with ``auxiliary_loss``, every other (``_dn_i``)."""
        denoising = detection.denoising
        if denoising is None:
            return None
        config = self.config
        counts = [len(t["class_labels"]) for t in labels]
        groups = denoising.queries.groups
        indices = denoising.queries.indices(counts)
        num_boxes = max(sum(counts), 1) * groups
        criterion = GroundingDinoImageLoss(matcher=None, focal_alpha=config.focal_alpha, losses=[])
        text_mask = self.route_text_mask(route_mask, denoising.outputs_class[-1])
        if targets is None:
            targets = self.mask_targets(detection, labels)
        num_masks = max(sum(counts[i] for i in targets), 1) * groups
        weights = {"loss_ce": CLASS_LOSS_WEIGHT, "loss_bbox": config.bbox_loss_coefficient,
                   "loss_giou": config.giou_loss_coefficient, "loss_mask": getattr(config, "mask_weight", 0.0),
                   "loss_dice": getattr(config, "dice_weight", 0.0)}  # fmt: skip
        layers = denoising.outputs_class.shape[0]
        outputs = [("_dn", layers - 1)]
        if config.auxiliary_loss:
            outputs += [(f"_dn_{i}", i) for i in range(layers - 1)]
        total = denoising.outputs_class.new_zeros((), dtype=torch.float32)
        loss_dict = {}
        for suffix, layer in outputs:
            out = {"logits": denoising.outputs_class[layer].float(), "pred_boxes": denoising.outputs_coord[layer].float(),
                   "label_maps": tuple(label_maps), "text_mask": text_mask}  # fmt: skip
            terms = {**criterion.loss_labels(out, list(labels), indices, num_boxes),
                     **criterion.loss_boxes(out, list(labels), indices, num_boxes)}  # fmt: skip
            if targets:
                terms["loss_mask"], terms["loss_dice"] = self.mask_terms(
                    denoising.mask_embeddings[layer], detection.mask_features, indices, targets, num_masks
                )
            for key, value in terms.items():
                loss_dict[key + suffix] = value
                total = total + weights[key] * value
        return total, loss_dict

    @staticmethod
    def route_text_mask(route_mask: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """As transformers' ``build_text_mask``: for ``logits`` [B, Q, width], True where query q of
        sample b scores a real text token (route)."""
        text_mask = torch.zeros_like(logits, dtype=torch.bool)
        text_mask[:, :, : route_mask.shape[1]] = route_mask[:, None, :]
        return text_mask

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
        [n, 4] normalised cxcywh, and with a mask head optionally ``masks`` [n, h, w] (:meth:`mask_loss`).
        In training with labels and ``dn_number`` > 0, denoising queries join the decoder
        (:meth:`denoising_queries`) and their terms the loss (:meth:`denoising_loss`)."""
        route_mask = route_mask.to(device=queries.device, dtype=torch.bool)
        tokens, self_attn, position_ids = self.text_features(queries, route_mask)
        pixel_values = pixel_values.to(tokens.dtype)  # the detector's dtype (float32 pixels, bf16 model)
        denoising = None
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
            if self.training:
                denoising = self.denoising_queries(labels, tokens, route_mask)
        detection = self.detect_with_text(
            pixel_values, pixel_mask, tokens, route_mask, self_attn, position_ids, denoising
        )

        loss = loss_dict = None
        if labels is not None:
            width = detection.logits.shape[-1]
            label_maps = self.route_label_maps(route_mask, width)
            text_mask = self.route_text_mask(route_mask, detection.logits)
            loss, loss_dict = self.detection_loss(detection, labels, label_maps, text_mask)
            targets = self.mask_targets(detection, labels)
            for extra in (
                self.mask_loss(detection, labels, label_maps, targets),
                self.denoising_loss(detection, labels, label_maps, route_mask, targets),
            ):
                if extra is not None:
                    loss = loss + extra[0]
                    loss_dict = {**loss_dict, **extra[1]}

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
        masks: bool = True,
    ) -> list[dict[str, torch.Tensor]]:
        """Per sample: each object query's best valid route (max sigmoid score), kept above
        ``threshold``, sorted by score. ``target_sizes`` [(height, width)] per sample. Returns
        ``{"scores" [n], "routes" [n] long, "boxes" [n, 4] xyxy in pixels}`` (not clipped, as
        transformers' post-processing); with a mask head (and ``masks``) also ``"masks"`` [n, height, width] bool:
        each kept query's logits upsampled by the mask stride, cut to the image's part of the padded
        input, resized to ``target_sizes`` and ``sigmoid > 0.5`` (official ``post_process_instseg_gdino``)."""
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

        detection = outputs.detection
        results = []
        for b in range(logits.shape[0]):
            keep = scores[b] > threshold
            order = scores[b][keep].argsort(descending=True)
            found = {
                "scores": scores[b][keep][order],
                "routes": routes[b][keep][order],
                "boxes": xyxy[b][keep][order],
            }
            if masks and detection is not None and detection.mask_features is not None:
                queries = keep.nonzero()[:, 0][order]
                found["masks"] = pixel_masks(detection, b, queries, [int(v) for v in sizes[b].tolist()])
            results.append(found)
        return results


def pixel_masks(
    detection: TextDetectionOutput, b: int, queries: torch.Tensor, size: list[int]
) -> torch.Tensor:
    """Sample ``b``'s masks of ``queries`` [n] as bools [n, height, width] for an image of ``size``."""
    if queries.numel() == 0:
        return torch.zeros((0, *size), dtype=torch.bool, device=queries.device)
    embeddings = detection.mask_embeddings[-1][b : b + 1, queries].float()
    logits = mask_logits(embeddings, detection.mask_features[b : b + 1].float())
    h, w = logits.shape[-2:]
    stride = detection.mask_stride
    logits = F.interpolate(logits, size=(h * stride, w * stride), mode="bilinear", align_corners=False)
    real_h, real_w = detection.input_sizes[b]
    logits = F.interpolate(logits[..., :real_h, :real_w], size=size, mode="bilinear", align_corners=False)
    return logits[0].sigmoid() > 0.5
