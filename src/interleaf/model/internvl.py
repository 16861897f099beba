"""InternVL-Chat: InternViT -> pixel shuffle -> ``mlp1`` projector -> decoder LLM.

    pixel_values [N, 3, 448, 448] --ViT--> [N, 1025, C] --drop CLS, 32x32 grid, pixel shuffle-->
    [N, 256, 4C] --mlp1 (LayerNorm, Linear, GELU, Linear)--> image_embeds [N, 256, H]

The ``N * 256`` image embeddings overwrite the token embeddings at the ``<IMG_CONTEXT>`` positions,
in order (all tiles of all images, row-major over the batch), and the LLM runs on the result.
"""

from __future__ import annotations

import torch
from torch import nn

from interleaf.errors import InputError
from interleaf.model.cache import KVCache
from interleaf.model.config import InternVLConfig
from interleaf.model.intern_vit import InternVisionModel, pixel_shuffle
from interleaf.model.llm import DecoderLayer, DecoderLM, ModelOutput


def check_image_tokens(n_tokens: int, n_feats: int, n_tiles: int | str, ctx: int, per_tile: int) -> None:
    """The one-line error when a prompt's ``<IMG_CONTEXT>`` tokens (id ``ctx``) are not as many as the
    image embeddings that fill them (``n_tiles`` tiles x ``per_tile``)."""
    if n_tokens != n_feats:
        raise InputError(
            f"input_ids: {n_tokens} <IMG_CONTEXT> tokens (image token id {ctx}) but {n_feats} image "
            f"embeddings ({n_tiles} tiles x {per_tile})"
        )


class InternVLChatModel(nn.Module):
    def __init__(self, config: InternVLConfig, layer_cls: type[DecoderLayer] = DecoderLayer) -> None:
        super().__init__()
        self.config = config
        vit, llm = config.vision.hidden_size, config.llm.hidden_size
        scale = int(1 / config.downsample_ratio) ** 2
        self.vision_model = self.build_vision_model()
        self.mlp1 = nn.Sequential(
            nn.LayerNorm(vit * scale, eps=config.projector_eps),
            nn.Linear(vit * scale, llm),
            nn.GELU(),
            nn.Linear(llm, llm),
        )
        self.language_model = DecoderLM(config.llm, layer_cls)

    def build_vision_model(self) -> nn.Module:
        """The vision encoder; a subclass (e.g. Mono-InternVL's patch-only embedding) may replace it."""
        return InternVisionModel(self.config.vision)

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return self.language_model.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.language_model.lm_head.weight.dtype

    @property
    def num_image_token(self) -> int:
        return self.config.num_image_token

    # ------------------------------------------------------------------ vision
    def extract_feature(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] -> image embeddings [N, num_image_token, H_llm]."""
        x = self.vision_model(pixel_values, select_layer=self.config.select_layer)
        x = x[:, 1:]  # drop CLS
        n, p, c = x.shape
        side = int(p**0.5)
        x = x.reshape(n, side, side, c)  # row-major patch grid
        x = pixel_shuffle(x, self.config.downsample_ratio, self.config.ps_version)
        x = x.reshape(n, -1, x.shape[-1])
        return self.mlp1(x)

    def embed(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings with image features at the ``<IMG_CONTEXT>`` positions: [B, S, H]."""
        embeds = self.language_model.model.embed_tokens(input_ids)
        if image_embeds is None and pixel_values is None:
            return embeds
        ctx = self.config.image_token_id
        if ctx is None:
            raise InputError(
                "config: img_context_token_id is not set (no <IMG_CONTEXT> token in the tokenizer)"
            )
        # found before the vision pass is queued, so this host sync does not wait for the ViT; writing
        # by index keeps the backward sync-free too (masked_scatter's backward is a masked_select)
        positions = (input_ids == ctx).flatten().nonzero().squeeze(1)
        n_tokens = positions.numel()
        if image_embeds is not None:
            n_tiles = image_embeds.shape[0] if image_embeds.dim() == 3 else "?"
            n_feats = image_embeds.numel() // embeds.shape[-1]
        else:  # the ViT's patch grid after pixel shuffle, per tile
            patch = self.config.vision.patch_size
            grid = (pixel_values.shape[-2] // patch) * (pixel_values.shape[-1] // patch)
            n_tiles = pixel_values.shape[0]
            n_feats = n_tiles * int(grid * self.config.downsample_ratio**2)
        check_image_tokens(n_tokens, n_feats, n_tiles, ctx, self.num_image_token)
        if image_embeds is None:
            image_embeds = self.extract_feature(pixel_values)
        feats = image_embeds.reshape(-1, embeds.shape[-1]).to(embeds.dtype)
        return embeds.flatten(0, 1).index_copy(0, positions, feats).view_as(embeds)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        cache_position: torch.Tensor | None = None,
        visual_mask: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        output_hidden_states: bool = False,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
    ) -> ModelOutput:
        """See :meth:`interleaf.model.llm.DecoderLM.forward`; ``pixel_values`` [N_tiles, 3, H, W]
        (or precomputed ``image_embeds`` [N_tiles, T, H]) fill the ``<IMG_CONTEXT>`` positions.
        ``cu_seqlens`` (int32 [n_segments + 1] over the flattened [B * S] tokens): packed samples,
        variable-length attention (each sample attends causally to itself only)."""
        if inputs_embeds is None:
            if input_ids is None:
                raise InputError("forward: pass input_ids or inputs_embeds")
            inputs_embeds = self.embed(input_ids, pixel_values, image_embeds)
        if visual_mask is None and input_ids is not None and self.config.image_token_id is not None:
            visual_mask = input_ids == self.config.image_token_id
        return self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            kv_cache=kv_cache,
            cache_position=cache_position,
            visual_mask=visual_mask,
            logits_to_keep=logits_to_keep,
            output_hidden_states=output_hidden_states,
            cu_seqlens=cu_seqlens,
            max_seqlen=max_seqlen,
        )

    def make_cache(
        self, batch_size: int, max_len: int, dtype: torch.dtype | None = None, device=None
    ) -> KVCache:
        """A static :class:`KVCache` sized for this model's LLM."""
        return self.language_model.make_cache(batch_size, max_len, dtype=dtype, device=device)

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def init_weights(self, seed: int = 0, std: float | None = None) -> None:
        """Random init that keeps random models numerically sane: normal(0, 0.02) for linear/embedding
        weights and ViT tokens, zero biases, unit norms, LayerScale = ``vision.initializer_factor``."""
        gen = torch.Generator().manual_seed(seed)
        std = std if std is not None else self.config.llm.initializer_range
        for name, p in self.named_parameters(remove_duplicate=True):
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ("ls1", "ls2"):
                p.fill_(self.config.vision.initializer_factor)
            elif leaf == "bias":
                p.zero_()
            elif p.dim() == 1:  # norm weights
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32).mul_(std).to(p.dtype))
        self.language_model.tie_weights()
