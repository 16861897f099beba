"""VisionLLM v2: one InternVL MLLM that hands vision tasks to task decoders through "super links".

    prompt + image --InternVL--> "red square[DET]<q1..q4>, blue circle[DET]<q1..q4>"
    final hidden states at the query slots q1..q4 of every route   [B, R, num_embs, H]
        --Grounding DINO (class "r" = route r)--> boxes per route

Routing tokens (added to the tokenizer) name the tool: ``[DET] [GRD] [SEG]`` (the detector),
``[POSE]`` (a keypoint decoder), ``[GEN] [EDIT]`` (image generation / editing). Right after every
routing token sit its *super-link queries*: ``num_embs`` (4) slots with the token ids ``[EMB]``,
``[EMB2]`` ... for perception routes, ``num_embs_gen`` (64) slots of ``[EMB]`` for GEN/EDIT. Their
input embeddings are not the token embeddings but learnable tables: ``emb_embeddings_det`` (shared by
DET/GRD/SEG), ``emb_embeddings_pose``, ``emb_embeddings_gen``, ``emb_embeddings_edit``, as upstream
(OpenGVLab/VisionLLM, ``VisionLLMv2Model``). The LLM's final (normed) hidden states at the slots are the
link: a decoder reads them, and its loss flows back into the LLM end to end.

- **Training**: the answer text already holds the slots (``cat[DET][EMB][EMB2][EMB3][EMB4]``); their
  embeddings are replaced and the slots are left out of the LM loss (the routing token itself is
  learnt). With ``detection`` targets, the detector's loss is added to the LM loss.
- **Generation**: once the model emits a routing token, the token and its query slots are run through
  the LLM as one chunk (KV cache), their hidden states kept, and decoding goes on from the last slot.

Built here: the super link for all six routing tokens and three of upstream's decoders: DET/GRD/SEG
(Grounding DINO, :mod:`interleaf.model.grounding_dino`), GEN (Stable Diffusion) and EDIT
(InstructPix2Pix), both :mod:`interleaf.model.stable_diffusion` (attributes ``sd`` and ``ip2p``, as
upstream). The pose decoder (UniPose upstream) is not: :meth:`VisionLLMv2Model.generate` returns POSE
routes' hidden states for a decoder of one's own. Visual prompts: with ``link.region_token_id`` set,
each ``<region>`` token of a prompt takes upstream's :class:`RegionEncoder` feature of one region
(a box or mask on the image). The backbone is the InternVL of this package (upstream's 26B model is
InternViT + pixel shuffle + ``mlp1`` + InternLM2 as well).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from interleaf.errors import CheckpointError, ConfigError, InputError, is_number
from interleaf.model.cache import KVCache
from interleaf.model.config import InternVLConfig
from interleaf.model.internvl import InternVLChatModel
from interleaf.processing.image import load_image, to_rgb

ROUTE_TOKENS = {
    "det": "[DET]",
    "grd": "[GRD]",
    "seg": "[SEG]",
    "pose": "[POSE]",
    "gen": "[GEN]",
    "edit": "[EDIT]",
}
EMB_TOKENS = ["[EMB]"] + [f"[EMB{i}]" for i in range(2, 9)]
SPAN_TOKENS = ["<det>", "</det>", "<grd>", "</grd>", "<reg>", "</reg>"]
REGION_TOKEN = "<region>"  # a visual prompt: its embedding is the region encoder's feature of one region
DETECTOR_ROUTES = ("det", "grd", "seg")  # the routes Grounding DINO serves
DECODER_OF = {"gen": "sd", "edit": "ip2p"}  # the diffusion routes' decoders (attribute = config key)
DIFFUSION_DIRS = {"sd": "stable_diffusion", "ip2p": "instruct_pix2pix"}  # their pipeline folders
TABLE_OF = {"det": "det", "grd": "det", "seg": "det", "pose": "pose", "gen": "gen", "edit": "edit"}
IGNORE_INDEX = -100
# init_visionllm's default detector: the tiny Grounding DINO, wider and without dropout, which learns
# to tell two objects apart in a few hundred CPU steps (tests/test_visionllm_train.py)
TINY_DETECTOR = {"d_model": 64, "encoder_ffn_dim": 128, "decoder_ffn_dim": 128, "dropout": 0.0}
CONFIG_KEY = "visionllmv2"
TINY_DIFFUSION_SIZE = 64  # init_visionllm's tiny pipelines make 64 x 64 images (32 x 32 latents)


@dataclass
class SuperLinkConfig:
    """The super-link settings; ``route_token_ids`` / ``emb_token_id`` come from the tokenizer
    (:func:`add_super_link_tokens`), ``gdino`` is a ``transformers.GroundingDinoConfig`` as a dict,
    ``sd`` / ``ip2p`` a :class:`~interleaf.model.stable_diffusion.DiffusionLinkConfig` as a dict (the
    pipelines themselves are folders beside the checkpoint's weights)."""

    route_token_ids: dict[str, int] = field(default_factory=dict)
    emb_token_id: int = -1
    num_embs: int = 4
    num_embs_gen: int = 64
    gdino: dict[str, Any] | None = None
    detector_size: int = 800  # the detector's input: shortest edge (longest <= 1333/800 of it)
    sd: dict[str, Any] | None = None
    ip2p: dict[str, Any] | None = None
    region_token_id: int | None = None  # set: the model has upstream's region encoder (visual prompts)
    region_points: int = 2304  # the region encoder samples at most this many mask pixels (48 x 48)

    def __post_init__(self) -> None:
        if not 1 <= self.num_embs <= len(EMB_TOKENS):
            raise ConfigError(f"{CONFIG_KEY}.num_embs: must be 1..{len(EMB_TOKENS)}, got {self.num_embs}")
        if self.detector_size < 32:
            raise ConfigError(f"{CONFIG_KEY}.detector_size: must be >= 32, got {self.detector_size}")
        if self.num_embs_gen < 1:
            raise ConfigError(f"{CONFIG_KEY}.num_embs_gen: must be >= 1, got {self.num_embs_gen}")
        unknown = sorted(set(self.route_token_ids) - set(ROUTE_TOKENS))
        if unknown:
            raise ConfigError(f"{CONFIG_KEY}.route_token_ids: unknown routes {unknown}")

    def num_queries(self, kind: str) -> int:
        return len(self.query_ids(kind))

    def query_ids(self, kind: str) -> list[int]:
        """The token ids in the slots after a ``kind`` routing token."""
        if TABLE_OF[kind] in ("gen", "edit"):
            return [self.emb_token_id] * self.num_embs_gen
        return list(range(self.emb_token_id, self.emb_token_id + self.num_embs))


def add_super_link_tokens(tokenizer: Any, num_embs: int = 4, region: bool = False) -> dict[str, Any]:
    """Add the routing, query and span tokens (special, not split), and with ``region`` the
    ``<region>`` visual-prompt token, to ``tokenizer``; returns the ``route_token_ids`` /
    ``emb_token_id`` (/ ``region_token_id``) for :class:`SuperLinkConfig`. The ``[EMB*]`` ids must be
    consecutive (a perception route's slots are ``[EMB] .. [EMB{num_embs}]``)."""
    from tokenizers import AddedToken

    vocab = tokenizer.get_vocab()
    wanted = [*ROUTE_TOKENS.values(), *EMB_TOKENS, *SPAN_TOKENS] + ([REGION_TOKEN] if region else [])
    missing = [t for t in wanted if t not in vocab]
    if missing:
        tokenizer.add_tokens(
            [AddedToken(t, special=True, normalized=False) for t in missing], special_tokens=True
        )
    ids = [tokenizer.convert_tokens_to_ids(t) for t in EMB_TOKENS[:num_embs]]
    if ids != list(range(ids[0], ids[0] + num_embs)):
        raise ConfigError(f"tokenizer: the ids of {EMB_TOKENS[:num_embs]} are not consecutive ({ids})")
    routes = {k: tokenizer.convert_tokens_to_ids(t) for k, t in ROUTE_TOKENS.items()}
    out = {"route_token_ids": routes, "emb_token_id": ids[0]}
    if region:
        out["region_token_id"] = tokenizer.convert_tokens_to_ids(REGION_TOKEN)
    return out


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of [N, C, H, W] (eps 1e-6), as upstream's region encoder uses."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - x.mean(1, keepdim=True)) / torch.sqrt(x.var(1, keepdim=True, unbiased=False) + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class RegionEncoder(nn.Module):
    """Upstream's ``RegionEncoder`` (``mask_pool_type="grid_sample"``, as VisionLLM v2 builds it): one
    feature per region for its ``<region>`` token.

        [image (normalised, the global view) ; mask]   [n, 4, S, S]
          -> mask_embedding: Conv(k = s = patch/2) LN2d GELU Conv(k = s = 2) LN2d GELU Conv(1x1)
                                                       [n, C_vit, S/patch, S/patch]
          for each of the ViT's last 3 layers (CLS dropped, on the patch grid): x = x + level;
          the mean of x bilinearly sampled at (at most ``num_points``) mask pixels -> up_dim
          -> the mean over the 3 levels                [n, H_llm]

    Mask pixels are sampled at (column / S, row / S), as upstream's ``point_sample``; a mask with more
    pixels than ``num_points`` contributes a uniform random subset of them."""

    def __init__(self, embed_dim: int, out_dim: int, patch_size: int = 14, hidden_dim: int = 256,
                 num_points: int = 2304) -> None:  # fmt: skip
        super().__init__()
        k = patch_size // 2
        self.mask_embedding = nn.Sequential(
            nn.Conv2d(4, hidden_dim // 4, kernel_size=k, stride=k),
            LayerNorm2d(hidden_dim // 4),
            nn.GELU(),
            nn.Conv2d(hidden_dim // 4, hidden_dim, kernel_size=2, stride=2),
            LayerNorm2d(hidden_dim),
            nn.GELU(),
            nn.Conv2d(hidden_dim, embed_dim, kernel_size=1),
        )
        self.up_dim = nn.Linear(embed_dim, out_dim)
        self.num_points = num_points

    def forward(
        self,
        images: torch.Tensor,
        masks: torch.Tensor,
        levels: list[torch.Tensor],
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """``images`` [n, 3, S, S], ``masks`` [n, S, S] (0/1), ``levels`` [n, (S/patch)^2, C_vit] each
        -> [n, out_dim]."""
        x = self.mask_embedding(torch.cat([images, masks[:, None].to(images.dtype)], dim=1))
        n, c, h, w = x.shape
        points, valid = self.sample_points(masks, generator)  # [n, P, 2] (x, y) in [0, 1), [n, P]
        grid = (2 * points - 1)[:, :, None].to(torch.float32)  # [n, P, 1, 2]
        outs = []
        for level in levels:
            x = x + level.transpose(1, 2).reshape(n, c, h, w).to(x.dtype)  # upstream sums the levels up
            sampled = F.grid_sample(x.float(), grid, align_corners=False)[..., 0].transpose(1, 2)  # [n, P, C]
            mean = (sampled * valid[..., None]).sum(1) / valid.sum(1, keepdim=True).clamp(min=1)
            outs.append(self.up_dim(mean.to(x.dtype)))
        return torch.stack(outs).mean(0)

    def sample_points(
        self, masks: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each mask's pixels (at most ``num_points``, a random subset in pixel order) as (x, y)
        fractions of the side, zero-padded: points [n, P, 2], valid [n, P]."""
        rows = []
        for mask in masks:
            yx = mask.nonzero()
            if len(yx) > self.num_points:
                keep = torch.randperm(len(yx), generator=generator, device="cpu")[: self.num_points]
                yx = yx[keep.sort().values.to(yx.device)]
            rows.append(yx.flip(-1).float() / torch.tensor([mask.shape[1], mask.shape[0]], device=yx.device))
        p = max(1, max(len(r) for r in rows))
        points = masks.new_zeros(len(rows), p, 2, dtype=torch.float32)
        valid = masks.new_zeros(len(rows), p, dtype=torch.float32)
        for i, r in enumerate(rows):
            points[i, : len(r)], valid[i, : len(r)] = r, 1
        return points, valid


@dataclass
class Regions:
    """The regions one prompt's ``<region>`` tokens name: ``image`` [3, S, S] the image's global view
    (normalised, as the ViT sees it) and ``masks`` [n, S, S] (0/1) on it, in token order."""

    image: torch.Tensor
    masks: torch.Tensor


@dataclass
class Link:
    """One route in a sequence: the routing token at ``position``, its slots right after it."""

    kind: str
    position: int
    num_queries: int

    @property
    def slots(self) -> slice:
        return slice(self.position + 1, self.position + 1 + self.num_queries)


@dataclass
class VisionLLMv2Output:
    """``loss`` = ``lm_loss`` (+ ``det_loss`` + ``sd_loss`` + ``ip2p_loss``); ``logits`` [B, S, V];
    ``hidden`` [B, S, H] (final norm); ``links`` per row; ``det`` the detector's output (when detection
    inputs were given)."""

    logits: torch.Tensor
    hidden: torch.Tensor
    links: list[list[Link]]
    loss: torch.Tensor | None = None
    lm_loss: torch.Tensor | None = None
    det_loss: torch.Tensor | None = None
    sd_loss: torch.Tensor | None = None
    ip2p_loss: torch.Tensor | None = None
    det: Any = None


@dataclass
class Route:
    """A route of a generated answer: its tool, the answer text before it since the previous route
    (the category or phrase), and the final hidden states of its query slots [num_queries, H]."""

    kind: str
    phrase: str
    states: torch.Tensor
    token_index: int  # index of the routing token in the generated ids


@dataclass
class Generation:
    token_ids: list[int]
    text: str
    routes: list[Route]
    finish_reason: str  # "stop" or "length"


class VisionLLMv2Model(InternVLChatModel):
    """InternVL + super-link query tables (+ the Grounding DINO tool when ``link.gdino`` is set; the
    diffusion tools ``sd`` / ``ip2p`` are attached with :meth:`add_diffusion`)."""

    def __init__(self, config: InternVLConfig, link: SuperLinkConfig) -> None:
        super().__init__(config)
        self.link = link
        h = config.llm.hidden_size
        self.emb_embeddings_det = nn.Embedding(link.num_embs, h)
        self.emb_embeddings_pose = nn.Embedding(link.num_embs, h)
        self.emb_embeddings_gen = nn.Embedding(link.num_embs_gen, h)
        self.emb_embeddings_edit = nn.Embedding(link.num_embs_gen, h)
        self.gdino = None
        if link.gdino is not None:
            from transformers import GroundingDinoConfig

            from interleaf.model.grounding_dino import SuperLinkGroundingDino

            self.gdino = SuperLinkGroundingDino(GroundingDinoConfig(**link.gdino), h)
        # built from a pipeline folder, not from the config alone (the CLIP tokenizer is files)
        self.sd: Any = None
        self.ip2p: Any = None
        self.region_encoder = None
        if link.region_token_id is not None:
            v = config.vision
            self.region_encoder = RegionEncoder(v.hidden_size, h, v.patch_size, num_points=link.region_points)
        self._kind_of = {i: k for k, i in link.route_token_ids.items()}

    def add_diffusion(self, module: Any) -> None:
        """Attach a :class:`~interleaf.model.stable_diffusion.SuperLinkDiffusion` as the tool of its
        kind's routes (``sd`` for GEN, ``ip2p`` for EDIT); its settings go into ``link``."""
        name = DECODER_OF[module.config.kind]
        setattr(self, name, module)
        setattr(self.link, name, asdict(module.config))

    def diffusion(self, kind: str) -> Any:
        """The GEN or EDIT route's decoder, or None."""
        return getattr(self, DECODER_OF[kind])

    @torch.no_grad()
    def init_weights(self, seed: int = 0, std: float | None = None) -> None:
        """InternVL's init for the MLLM and the query tables; the decoders keep their own init."""
        tools = {name: getattr(self, name) for name in ("gdino", *DECODER_OF.values())}
        for name in tools:
            setattr(self, name, None)
        try:
            super().init_weights(seed, std)
        finally:
            for name, module in tools.items():
                setattr(self, name, module)

    def table(self, kind: str) -> nn.Embedding:
        return getattr(self, f"emb_embeddings_{TABLE_OF[kind]}")

    # ------------------------------------------------------------------ links
    def find_links(self, input_ids: torch.Tensor) -> list[list[Link]]:
        """The routes of each row of ``input_ids`` [B, S]; every routing token must be followed by its
        query slots (training data and :meth:`generate`'s chunks are)."""
        route_ids = torch.tensor(list(self._kind_of), dtype=input_ids.dtype, device=input_ids.device)
        hits = torch.isin(input_ids, route_ids).nonzero().tolist() if len(self._kind_of) else []
        ids = input_ids.tolist() if hits else None
        rows: list[list[Link]] = [[] for _ in range(input_ids.shape[0])]
        for b, p in hits:
            kind = self._kind_of[ids[b][p]]
            want = self.link.query_ids(kind)
            got = ids[b][p + 1 : p + 1 + len(want)]
            if got != want:
                raise InputError(
                    f"input_ids: row {b}, routing token {ROUTE_TOKENS[kind]} at position {p} is not followed "
                    f"by its {len(want)} query tokens ([EMB]...)"
                )
            rows[b].append(Link(kind, p, len(want)))
        return rows

    def with_slots(self, ids: list[int]) -> list[int]:
        """``ids`` with the query slots after every routing token that lacks them, as upstream's
        inference inserts them: an earlier answer fed back as history (``Generation.text`` holds the
        routing tokens only) then reads as the model saw it when it wrote the answer."""
        out: list[int] = []
        for i, tok in enumerate(ids):
            out.append(tok)
            kind = self._kind_of.get(tok)
            want = self.link.query_ids(kind) if kind else []
            if want and ids[i + 1 : i + 1 + len(want)] != want:
                out += want
        return out

    def embed(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
        links: list[list[Link]] | None = None,
        regions: list[Regions | None] | None = None,
    ) -> torch.Tensor:
        """InternVL's embeddings with the query tables written into every route's slots, and each
        ``<region>`` token's embedding replaced by its region's feature (``regions``: per row, the
        regions its ``<region>`` tokens name, in order): [B, S, H]."""
        x = super().embed(input_ids, pixel_values, image_embeds)
        links = self.find_links(input_ids) if links is None else links
        for b, row in enumerate(links):
            for link in row:
                x[b, link.slots] = self.table(link.kind).weight.to(x.dtype)
        if regions is not None:
            x = self.embed_regions(input_ids, x, regions)
        return x

    def vision_levels(self, pixel_values: torch.Tensor, n: int = 3) -> list[torch.Tensor]:
        """The ViT's last ``n`` layer outputs without CLS, [N, patches, C] each (the region encoder's
        multi-scale features, upstream's ``hidden_states[-3:]``; with fewer than ``n`` layers that list
        starts with the embeddings output)."""
        vit = self.vision_model
        x = vit.embeddings(pixel_values.to(next(vit.parameters()).dtype))
        outs = [x[:, 1:]] if len(vit.encoder.layers) < n else []
        for i, layer in enumerate(vit.encoder.layers):
            x = layer(x)
            if i >= len(vit.encoder.layers) - n:
                outs.append(x[:, 1:])
        return outs

    def embed_regions(
        self, input_ids: torch.Tensor, x: torch.Tensor, regions: list[Regions | None]
    ) -> torch.Tensor:
        """``x`` [B, S, H] with the ``<region>`` embeddings replaced by the region encoder's features."""
        if len(regions) != len(input_ids):  # a row without its entry would keep bare <region> embeddings
            raise InputError(f"regions: {len(regions)} rows for a batch of {len(input_ids)}")
        if self.region_encoder is None:
            if any(r is not None for r in regions):
                raise ConfigError(f"{CONFIG_KEY}: regions given but the model has no region encoder")
            return x
        x = x.clone()
        for b, r in enumerate(regions):
            where = (input_ids[b] == self.link.region_token_id).nonzero()[:, 0]
            count = 0 if r is None else len(r.masks)
            if len(where) != count:
                raise InputError(
                    f"regions: row {b} has {len(where)} {REGION_TOKEN} tokens and {count} regions"
                )
            if count:
                image = r.image[None].to(x.device, x.dtype)
                levels = [level.expand(count, -1, -1) for level in self.vision_levels(image)]
                image = image.expand(count, -1, -1, -1)
                x[b, where] = self.region_encoder(image, r.masks.to(x.device), levels).to(x.dtype)
        return x

    def link_states(
        self, hidden: torch.Tensor, links: list[list[Link]], kinds: tuple[str, ...] = DETECTOR_ROUTES
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden states of the ``kinds`` routes' slots: queries [B, R, num_embs, H] (R = most routes in
        a row, zero-padded) and the valid-route mask [B, R]."""
        chosen = [[link for link in row if link.kind in kinds] for row in links]
        r = max((len(row) for row in chosen), default=0)
        n = self.link.num_queries(kinds[0])
        queries = hidden.new_zeros(hidden.shape[0], r, n, hidden.shape[-1])
        mask = torch.zeros(hidden.shape[0], r, dtype=torch.bool, device=hidden.device)
        for b, row in enumerate(chosen):
            if row:
                index = torch.tensor([i for link in row for i in range(link.slots.start, link.slots.stop)],
                                     device=hidden.device)  # fmt: skip
                queries[b, : len(row)] = hidden[b, index].view(len(row), n, -1)
                mask[b, : len(row)] = True
        return queries, mask

    # ------------------------------------------------------------------ training forward
    def forward(  # type: ignore[override]
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        det_pixel_values: torch.Tensor | None = None,
        det_pixel_mask: torch.Tensor | None = None,
        det_targets: list[dict[str, torch.Tensor]] | None = None,
        output_images: torch.Tensor | None = None,
        input_images: torch.Tensor | None = None,
        captions: list[str | None] | None = None,
        regions: list[Regions | None] | None = None,
    ) -> VisionLLMv2Output:
        """``input_ids`` [B, S] with the query slots in place; ``labels`` [B, S] (-100 = no loss; the
        slots are excluded whatever they hold). ``det_pixel_values`` [B, 3, h, w]: the detector's view of
        each row's image; ``det_targets`` per row ``{"class_labels": route indices among the row's
        DET/GRD/SEG routes, "boxes": [n, 4] normalised cx, cy, w, h}``, with a mask head optionally
        ``"masks"`` [n, h', w'] in {0, 1} over the row's image in the detector's input (top-left;
        a ``ConfigError`` without one). ``output_images`` [B, 3, r, r] in
        [-1, 1]: each row's target image for its GEN/EDIT routes (``input_images`` the image an EDIT
        route edits; ``captions`` per row, for upstream's caption loss, or None). ``regions`` per row:
        the regions its ``<region>`` tokens name (:meth:`embed`)."""
        links = self.find_links(input_ids)
        if pixel_values is not None:  # collate_detection's float32 pixels into a bf16 model
            pixel_values = pixel_values.to(next(self.vision_model.parameters()).dtype)
        embeds = self.embed(input_ids, pixel_values, links=links, regions=regions)
        out = self.language_model(inputs_embeds=embeds, attention_mask=attention_mask)
        result = VisionLLMv2Output(logits=out.logits, hidden=out.last_hidden_state, links=links)
        if labels is not None:
            labels = labels.clone()
            for b, row in enumerate(links):
                for link in row:
                    labels[b, link.slots] = IGNORE_INDEX
            targets = labels[:, 1:].flatten()
            # the mean over the labelled tokens; 0 (not NaN) when there are none
            result.lm_loss = F.cross_entropy(
                out.logits[:, :-1].flatten(0, 1).float(), targets, ignore_index=IGNORE_INDEX, reduction="sum"
            ) / (targets != IGNORE_INDEX).sum().clamp(min=1)
            result.loss = result.lm_loss
        if det_pixel_values is not None:
            if self.gdino is None:
                raise ConfigError(
                    f"{CONFIG_KEY}: detection inputs given but the model has no detector (gdino)"
                )
            if det_targets is not None and not self.gdino.mask_dim and any("masks" in t for t in det_targets):
                # the detector would train its boxes and drop the masks without a word
                raise ConfigError(
                    f"{CONFIG_KEY}: mask targets given but the detector has no mask head (gdino.mask_dim)"
                )
            queries, mask = self.link_states(result.hidden, links)
            result.det = self.gdino(
                det_pixel_values, queries, mask, pixel_mask=det_pixel_mask, labels=det_targets
            )
            if det_targets is not None:
                result.det_loss = result.det.loss
                result.loss = result.det_loss if result.loss is None else result.loss + result.det_loss
        if output_images is not None:
            for kind, name in DECODER_OF.items():
                rows = [(b, link) for b, row in enumerate(links) for link in row if link.kind == kind]
                if not rows:
                    continue
                module = self.diffusion(kind)
                if module is None:
                    raise ConfigError(
                        f"{CONFIG_KEY}: {ROUTE_TOKENS[kind]} targets given but the model has no {name}"
                    )
                index = [b for b, _ in rows]  # one target per route: its row's (as upstream)
                states = torch.stack([result.hidden[b, link.slots] for b, link in rows])
                caps = [captions[b] for b in index] if captions is not None else None
                loss = module.loss(
                    states,
                    output_images[index],
                    None if caps is None or None in caps else caps,
                    input_images[index] if input_images is not None else None,
                ).loss
                setattr(result, f"{name}_loss", loss)
                result.loss = loss if result.loss is None else result.loss + loss
        return result

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        max_new_tokens: int = 64,
        eos_token_id: int | list[int] | None = None,
        tokenizer: Any = None,
        regions: Regions | None = None,
    ) -> Generation:
        """Greedy decoding of one prompt ``input_ids`` [1, S] (routing tokens in it get their query slots
        if they lack them: :meth:`with_slots`); every routing token the model emits gets
        its query slots run through the LLM, and their hidden states come back as a :class:`Route`.
        ``tokenizer`` decodes the text and the routes' phrases; ``regions`` are the ones the prompt's
        ``<region>`` tokens name."""
        if input_ids.dim() != 2 or input_ids.shape[0] != 1:
            raise InputError(f"input_ids: one prompt [1, S] expected, got shape {list(input_ids.shape)}")
        input_ids = torch.tensor([self.with_slots(input_ids[0].tolist())], device=input_ids.device)
        if max_new_tokens < 0:
            raise InputError(f"max_new_tokens: must be >= 0, got {max_new_tokens}")
        if regions is None and self.link.region_token_id is not None:
            count = int((input_ids == self.link.region_token_id).sum())
            if count:  # embed checks the count only when regions are given: the bare token passed silently
                raise InputError(f"regions: the prompt has {count} {REGION_TOKEN} tokens and no regions")
        stops = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or ())
        lm = self.language_model
        # room for the answer and a few routes; _room grows it (doubling) when routes need more
        cache = self.make_cache(1, input_ids.shape[1] + max_new_tokens + 4 * (1 + self.link.num_embs) + 1)
        embeds = self.embed(input_ids, pixel_values, regions=[regions] if regions is not None else None)
        out = lm(inputs_embeds=embeds, kv_cache=cache, logits_to_keep=1)
        tokens: list[int] = []
        raw_routes: list[tuple[str, int, torch.Tensor]] = []
        finish = "length"
        for _ in range(max_new_tokens):
            tok = int(out.logits[0, -1].argmax())
            tokens.append(tok)
            if tok in stops:
                finish = "stop"
                break
            kind = self._kind_of.get(tok)
            ids = [tok] + (self.link.query_ids(kind) if kind else [])
            cache = _room(cache, len(ids))
            chunk = torch.tensor([ids], device=input_ids.device)
            out = lm(inputs_embeds=self.embed(chunk), kv_cache=cache, logits_to_keep=1)
            if kind:
                raw_routes.append((kind, len(tokens) - 1, out.last_hidden_state[0, 1:].clone()))
        text, routes = "", []
        if tokenizer is not None:
            text = tokenizer.decode([t for t in tokens if t not in stops], skip_special_tokens=False)
        start = 0
        for kind, index, states in raw_routes:
            phrase = route_phrase(tokenizer.decode(tokens[start:index])) if tokenizer is not None else ""
            routes.append(Route(kind, phrase, states, index))
            start = index + 1
        return Generation(tokens, text, routes, finish)


def _room(cache: KVCache, extra: int) -> KVCache:
    """``cache``, or a larger copy of it when ``extra`` more tokens would not fit (GEN/EDIT routes)."""
    if cache.length + extra <= cache.max_len:
        return cache
    bigger = KVCache(len(cache.keys), cache.batch_size, 2 * (cache.length + extra), cache.keys[0].shape[1],
                     cache.keys[0].shape[-1], dtype=cache.dtype, device=cache.device)  # fmt: skip
    for old, new in zip(cache.keys + cache.values, bigger.keys + bigger.values):
        new[:, :, : cache.length] = old[:, :, : cache.length]
    bigger.length = cache.length
    return bigger


def detector_inputs(images: list[Any], size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Grounding DINO's preprocessing (transformers' image processor: resize to shortest edge ``size``,
    ImageNet mean/std, pad to the batch's largest): pixel_values [B, 3, h, w], pixel_mask [B, h, w]."""
    from transformers import GroundingDinoImageProcessorPil

    proc = GroundingDinoImageProcessorPil(size={"shortest_edge": size, "longest_edge": size * 1333 // 800})
    out = proc(images=[to_rgb(load_image(im)) for im in images], return_tensors="pt")
    return out["pixel_values"], out["pixel_mask"]


def check_box(box: Any, name: str, width: int, height: int) -> list[float]:
    """A pixel box ``[x1, y1, x2, y2]`` (a record's, an option's) on a ``width`` x ``height`` image as
    floats, or an InputError naming ``name``."""
    if not (isinstance(box, (list, tuple)) and len(box) == 4 and all(is_number(v) for v in box)):
        raise InputError(f"{name}: must be [x1, y1, x2, y2], numbers")
    if not (box[2] > box[0] and box[3] > box[1]):
        raise InputError(f"{name}: x2 > x1 and y2 > y1 needed, got {box}")
    if not (box[0] < width and box[2] > 0 and box[1] < height and box[3] > 0):
        # clamping it to the image would leave a zero-size box on the edge
        raise InputError(f"{name}: {box} lies outside the {width}x{height} image")
    return [float(v) for v in box]


def region_inputs(model: VisionLLMv2Model, image: Any, boxes: list[list[float]]) -> Regions:
    """The :class:`Regions` of pixel ``boxes`` [x1, y1, x2, y2] on ``image``: its global view (the
    whole image resized to one tile) and one mask per box on it (the tile pixels whose centres fall in
    the box; at least the one nearest its centre). A box that is not one, or lies wholly off the
    image, is an InputError (:func:`check_box`)."""
    from interleaf.processing.image import preprocess_image

    image = to_rgb(load_image(image))
    side = model.config.image_size
    tiles = preprocess_image(image, max_num=1, min_num=1, image_size=side, use_thumbnail=False, dynamic=False)
    view = tiles[0]
    centres = (torch.arange(side, dtype=torch.float32) + 0.5) / side
    xs, ys = centres * image.width, centres * image.height
    masks = torch.zeros(len(boxes), side, side)
    for i, box in enumerate(boxes):
        x1, y1, x2, y2 = check_box(box, f"regions[{i}]", image.width, image.height)
        inside = ((ys >= y1) & (ys < y2))[:, None] & ((xs >= x1) & (xs < x2))[None]
        if not inside.any():  # a box narrower than a tile pixel: the centre of its part on the image
            # (the whole box's centre may lie off the image, and a negative index would wrap around)
            cy = (max(y1, 0) + min(y2, image.height)) / 2
            cx = (max(x1, 0) + min(x2, image.width)) / 2
            row, col = int(cy / image.height * side), int(cx / image.width * side)
            inside[min(side - 1, row), min(side - 1, col)] = True
        masks[i] = inside.float()
    return Regions(view, masks)


@torch.no_grad()
def answer(
    model: VisionLLMv2Model,
    tokenizer: Any,
    question: str,
    image: Any = None,
    threshold: float = 0.3,
    max_new_tokens: int = 64,
    num_inference_steps: int | None = None,
    seed: int = 0,
    regions: list[list[float]] | None = None,
) -> dict[str, Any]:
    """Ask ``question`` (about ``image``, or text only; ``regions``: pixel boxes [x1, y1, x2, y2] on
    ``image``, one per ``<region>`` in the question); every route of the answer goes to its tool:
    DET/GRD/SEG to the detector, GEN to ``sd``, EDIT to ``ip2p`` (which edits ``image``).

    Returns ``{"text", "finish_reason", "routes": [{"kind", "phrase"}], "detections": [{"route",
    "phrase", "score", "box": [x1, y1, x2, y2] pixels}] (by score), "images": [{"route", "kind",
    "image": PIL image}], "not_run": [{"route", "reason"}]}``; with a mask head, a detection of a
    SEG route also holds ``"mask"``: a numpy bool array [height, width] at the image's size (DET and
    GRD routes ask for boxes; masks are drawn only where SEG asks for them). ``routes_not_detected`` counts the
    detection routes past the detector's ``max_text_len``. ``seed`` seeds the diffusion sampling (and
    the region encoder's subset of a large mask's pixels)."""
    from interleaf.processing.image import preprocess_image
    from interleaf.processing.prompt import build_prompt
    from interleaf.processing.templates import get_template

    cfg = model.config
    tiles, pixels = [], None
    if image is not None:
        image = to_rgb(load_image(image))
        pixels = preprocess_image(image, max_num=cfg.max_dynamic_patch, min_num=cfg.min_dynamic_patch,
                                  image_size=cfg.image_size, use_thumbnail=cfg.use_thumbnail,
                                  dynamic=cfg.dynamic_image_size)  # fmt: skip
        tiles, pixels = [pixels.shape[0]], pixels.to(model.device, model.dtype)
    prompt = build_prompt(get_template(cfg.template), question, tiles, num_image_token=model.num_image_token)
    ids = torch.tensor([tokenizer.encode(prompt, add_special_tokens=False)], device=model.device)
    prompt_regions = None
    if regions:
        if image is None:
            raise InputError("regions: given without an image")
        prompt_regions = region_inputs(model, image, regions)
    # the region encoder samples a random subset of a large mask's pixels on the CPU RNG: seeded here,
    # the answer is repeatable and the caller's RNG is left as it was
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        gen = model.generate(ids, pixels, max_new_tokens, cfg.llm.eos_token_id, tokenizer, prompt_regions)
    result: dict[str, Any] = {
        "text": gen.text,
        "finish_reason": gen.finish_reason,
        "routes": [{"kind": r.kind, "phrase": r.phrase} for r in gen.routes],
        "detections": [],
        "images": [],
        "not_run": [],
    }
    for i, r in enumerate(gen.routes):
        why = _why_not_run(model, r.kind, image)
        if why:
            result["not_run"].append({"route": i, "reason": why})
        elif r.kind in DECODER_OF:
            generator = torch.Generator().manual_seed(seed + i)
            drawn = model.diffusion(r.kind).generate(
                r.states[None], input_images=[image] if r.kind == "edit" else None,
                num_inference_steps=num_inference_steps, generator=generator,
            )  # fmt: skip
            result["images"].append({"route": i, "kind": r.kind, "image": drawn[0]})
    chosen = [(i, r) for i, r in enumerate(gen.routes) if r.kind in DETECTOR_ROUTES]
    if chosen and not _why_not_run(model, chosen[0][1].kind, image):
        room = model.gdino.config.max_text_len
        if len(chosen) > room:  # the detector takes at most max_text_len phrases at once
            result["routes_not_detected"] = len(chosen) - room
            chosen = chosen[:room]
        result["detections"] = _detections(model, image, chosen, threshold)
    return result


def _why_not_run(model: VisionLLMv2Model, kind: str, image: Any) -> str | None:
    """Why a ``kind`` route of an answer about ``image`` (None: no image) cannot go to its tool."""
    if kind == "pose":
        return "no pose decoder"
    if kind in DETECTOR_ROUTES:
        if model.gdino is None:
            return "the model has no detector"
        return None if image is not None else "no image to detect in"
    if model.diffusion(kind) is None:
        return f"the model has no {DECODER_OF[kind]}"
    if kind == "edit":
        if image is None:
            return "no image to edit"
        factor = model.ip2p.vae_factor
        if min(image.size) < factor:  # no latent pixel to edit
            return f"the image ({image.width}x{image.height}) has a side under ip2p's {factor} pixels"
    return None


def _detections(
    model: VisionLLMv2Model, image: Any, chosen: list[tuple[int, Route]], threshold: float
) -> list[dict[str, Any]]:
    """The detector's boxes for the ``chosen`` (index, route) detection routes of an answer about
    ``image``: ``{"route", "phrase", "score", "box"}`` by score, and ``"mask"`` (bool [height, width])
    for a SEG route's detection when the detector has a mask head."""
    queries = torch.stack([r.states for _, r in chosen])[None]
    mask = torch.ones(1, len(chosen), dtype=torch.bool, device=queries.device)
    det_pixels, det_mask = detector_inputs([image], model.link.detector_size)
    out = model.gdino(
        det_pixels.to(queries.device, queries.dtype), queries, mask, pixel_mask=det_mask.to(queries.device)
    )
    # masks only where a route asks for them: each is drawn at the image's size
    seg = any(r.kind == "seg" for _, r in chosen)
    found = model.gdino.postprocess(out, [(image.height, image.width)], threshold=threshold, masks=seg)[0]
    masks = found.get("masks")
    result = []
    for k, (score, route, box) in enumerate(
        zip(found["scores"].tolist(), found["routes"].tolist(), found["boxes"].tolist())
    ):
        index, r = chosen[route]
        item = {"route": index, "phrase": r.phrase, "score": score, "box": box}
        if masks is not None and r.kind == "seg":
            item["mask"] = masks[k].cpu().numpy()
        result.append(item)
    return result


def detect(
    model: VisionLLMv2Model,
    tokenizer: Any,
    image: Any,
    question: str,
    threshold: float = 0.3,
    max_new_tokens: int = 64,
) -> dict[str, Any]:
    """:func:`answer` about ``image`` for a model that has a detector (else a ``ConfigError``)."""
    if model.gdino is None:
        raise ConfigError(f"{CONFIG_KEY}: this model has no detector (gdino)")
    return answer(model, tokenizer, question, image, threshold=threshold, max_new_tokens=max_new_tokens)


_SPAN_RE = re.compile("|".join(re.escape(t) for t in SPAN_TOKENS + list(ROUTE_TOKENS.values())))


def route_phrase(text: str) -> str:
    """The phrase a route names: the answer text since the previous route, after the last list
    separator or sentence break, without span tokens (``"Found: red square"`` -> ``"red square"``).
    A sentence break is a full stop before a capital, so an abbreviation in a phrase stays."""
    text = _SPAN_RE.sub(" ", text)
    text = re.split(r"[,;:\n]|\.\s+(?=[A-Z])", text)[-1]
    return " ".join(text.split()).strip(" .")


# ----------------------------------------------------------------------------- building, saving, loading
def build_visionllm(
    config: InternVLConfig, link: SuperLinkConfig, seed: int = 0, dtype: torch.dtype = torch.float32
) -> VisionLLMv2Model:
    """A randomly initialised model (the detector with transformers' own init)."""
    torch.manual_seed(seed)  # the detector's init draws from the global generator
    model = VisionLLMv2Model(config, link)
    model.init_weights(seed)
    return model.to(dtype).eval()


def init_visionllm(
    preset: str = "tiny",
    gdino: dict[str, Any] | None = None,
    detector: bool = True,
    seed: int = 0,
    gen: str | Path | None = None,
    edit: str | Path | None = None,
    diffusion: dict[str, dict[str, Any]] | None = None,
    region: bool = False,
    mask_dim: int = 0,
    dn_number: int = 0,
) -> tuple[VisionLLMv2Model, Any]:
    """A random-weight VisionLLM v2 on an interleaf preset, with the offline tokenizer plus the
    super-link tokens; ``gdino`` (a GroundingDinoConfig dict) defaults to a tiny detector, and
    ``detector=False`` builds none. ``mask_dim`` > 0 gives the detector upstream's mask head (the
    ``[SEG]`` route's masks; upstream: 256): the tiny detector gets the finest backbone level it
    needs, a ``gdino`` of one's own must have it (a backbone with at least 2 ``out_indices``, the
    finest the masks'). ``dn_number`` > 0 trains the detector with upstream's contrastive denoising
    queries (upstream: 100). ``gen`` / ``edit``: a Stable Diffusion / InstructPix2Pix pipeline
    folder (diffusers layout) for the GEN / EDIT routes, or ``"tiny"`` for a tiny random one;
    ``diffusion`` {"gen": {...}, "edit": {...}}: their ``DiffusionLinkConfig`` settings. ``region``
    adds the ``<region>`` token and upstream's region encoder (visual prompts)."""
    from interleaf.model.presets import PRESETS, make_tokenizer, preset_config_for

    if preset not in PRESETS:
        raise ConfigError(f"preset: unknown preset {preset!r} (choose from {', '.join(PRESETS)})")
    tok = make_tokenizer(PRESETS[preset][1]["family"])
    ids = add_super_link_tokens(tok, region=region)
    cfg = preset_config_for(preset, tok)
    if mask_dim < 0:
        raise ConfigError(f"mask_dim: must be >= 0, got {mask_dim}")
    if mask_dim and not detector:
        raise ConfigError("mask_dim: the mask head is the detector's, and detector=False builds none")
    if dn_number < 0:
        raise ConfigError(f"dn_number: must be >= 0, got {dn_number}")
    if dn_number and not detector:
        raise ConfigError("dn_number: denoising queries are the detector's, and detector=False builds none")
    if gdino is None and detector:
        from interleaf.model.grounding_dino import tiny_grounding_dino_config

        gdino = tiny_grounding_dino_config(
            **TINY_DETECTOR, **({"mask_dim": mask_dim} if mask_dim else {})
        ).to_dict()
    elif gdino is not None and mask_dim:
        gdino = {**gdino, "mask_dim": mask_dim}
    if dn_number:
        gdino = {**gdino, "dn_number": dn_number}
    link = SuperLinkConfig(**ids, gdino=gdino if detector else None)
    try:
        model = build_visionllm(cfg, link, seed=seed)
    except ValueError as exc:  # the detector's own check of its config (a mask head's backbone levels)
        raise ConfigError(f"gdino: {str(exc).splitlines()[0]}") from None
    for kind, source in (("gen", gen), ("edit", edit)):
        if source is not None:
            model.add_diffusion(_diffusion_from(source, kind, (diffusion or {}).get(kind, {}), cfg, seed))
    return model, tok


def _diffusion_from(
    source: str | Path, kind: str, settings: dict[str, Any], cfg: InternVLConfig, seed: int
) -> Any:
    """The ``kind`` decoder from a pipeline folder, or from a tiny random one (``source == "tiny"``)."""
    import tempfile

    from interleaf.model.stable_diffusion import DiffusionLinkConfig, SuperLinkDiffusion, make_tiny_pipeline

    config = DiffusionLinkConfig(kind=kind, **settings)
    torch.manual_seed(seed)  # the super-link mapper's init draws from the global generator
    if str(source) != "tiny":
        return SuperLinkDiffusion.from_pretrained(source, config, cfg.llm.hidden_size)
    if config.resolution is None:  # the tiny pipeline's own image size, not upstream's 512 / 256
        config.resolution = TINY_DIFFUSION_SIZE
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_tiny_pipeline(
            Path(tmp) / "pipeline", kind=kind, seed=seed, sample_size=TINY_DIFFUSION_SIZE // 2
        )
        return SuperLinkDiffusion.from_pretrained(folder, config, cfg.llm.hidden_size)


def save_visionllm(model: VisionLLMv2Model, tokenizer: Any, out_dir: str | Path) -> Path:
    """An InternVL-Chat checkpoint folder whose ``config.json`` carries a ``visionllmv2`` section; the
    query tables (``emb_embeddings_*``), the detector (``gdino.*``) and the diffusion decoders' super
    links (``sd.emb_proj.*``, ``sd.llm2sd_mapper*``, ...) are stored under their own names, and each
    diffusion pipeline (UNet, VAE, text encoder, tokenizer, scheduler) as a diffusers folder beside
    them (``stable_diffusion/``, ``instruct_pix2pix/``), which diffusers itself loads."""
    from interleaf.model.checkpoint import save_checkpoint

    out = save_checkpoint(model, tokenizer, out_dir, layout="internvl_chat", skip=_pipeline_prefixes(model))
    for name, folder in DIFFUSION_DIRS.items():
        module = getattr(model, name)
        if module is not None:
            module.save_pipeline(out / folder)
    config = json.loads((out / "config.json").read_text())
    config["architectures"] = ["VisionLLMv2"]
    config[CONFIG_KEY] = asdict(model.link)
    (out / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    return out


def _pipeline_prefixes(model: VisionLLMv2Model) -> tuple[str, ...]:
    """State-dict prefixes of the pipelines' own weights (stored in their folders, not with the rest)."""
    return tuple(f"{name}.sd_{part}." for name in DECODER_OF.values() if getattr(model, name) is not None
                 for part in ("unet", "vae", "text_encoder"))  # fmt: skip


def load_visionllm(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | str | None = None
) -> tuple[VisionLLMv2Model, Any]:
    """Load :func:`save_visionllm`'s folder: ``(model, tokenizer)``, eval mode; missing or extra tensors
    are named. ``dtype`` None keeps the stored floating dtype (as ``load_checkpoint``)."""
    from interleaf.model.checkpoint import (
        check_tensors,
        from_disk,
        parse_dtype,
        read_weights,
        stored_dtype,
        tensor_label,
    )
    from interleaf.model.tokenizer import IMG_CONTEXT, IMG_END, IMG_START, load_tokenizer

    path = Path(path)
    source = path / "config.json"
    try:
        raw = json.loads(source.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{source}: cannot read ({str(exc).splitlines()[0]})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get(CONFIG_KEY), dict):
        raise CheckpointError(f"{source}: not a VisionLLM v2 checkpoint (no {CONFIG_KEY!r} section)")
    section = raw.pop(CONFIG_KEY)
    raw["architectures"] = ["InternVLChatModel"]
    cfg = InternVLConfig.from_dict(raw, source=str(source))
    try:
        link = SuperLinkConfig(**section)
    except TypeError as exc:
        raise ConfigError(f"{source}: {CONFIG_KEY}: {exc}") from None
    tokenizer = load_tokenizer(path, cfg.template)
    vocab = tokenizer.get_vocab()  # the InternVL-Chat config does not store the image token ids
    cfg.img_context_token_id, cfg.img_start_token_id, cfg.img_end_token_id = (
        vocab.get(IMG_CONTEXT), vocab.get(IMG_START), vocab.get(IMG_END)
    )  # fmt: skip
    disk, origin = read_weights(path)
    sd = from_disk(disk, cfg, "internvl_chat", lambda name: tensor_label(path, origin, name))
    model = VisionLLMv2Model(cfg, link)
    for kind, name in DECODER_OF.items():
        settings = getattr(link, name)
        if settings is not None:
            from interleaf.model.stable_diffusion import DiffusionLinkConfig, SuperLinkDiffusion

            try:
                config = DiffusionLinkConfig(**settings)
            except TypeError as exc:
                raise ConfigError(f"{source}: {CONFIG_KEY}.{name}: {exc}") from None
            except ConfigError as exc:  # it names the field ("ip2p.cfg_drop_rate: ..."), not the file
                raise ConfigError(f"{source}: {CONFIG_KEY}.{exc}") from None
            if config.kind != kind:
                raise ConfigError(
                    f"{source}: {CONFIG_KEY}.{name}.kind: must be {kind!r}, got {config.kind!r}"
                )
            folder = path / DIFFUSION_DIRS[name]
            model.add_diffusion(SuperLinkDiffusion.from_pretrained(folder, config, cfg.llm.hidden_size))
    if cfg.llm.tie_word_embeddings:
        sd.pop("language_model.lm_head.weight", None)
    check_tensors(model, sd, path, origin, skip=_pipeline_prefixes(model))
    model.load_state_dict(sd, strict=False)
    model.language_model.tie_weights()
    dtype = parse_dtype(dtype) or stored_dtype(sd)
    return model.to(device, dtype).eval(), tokenizer
