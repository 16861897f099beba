"""Generation engine: prefill + KV-cache decode loop, greedy or sampled, batched, streamable.

    prefill:  model(input_ids [B, S], pixel_values, attention_mask [B, S], kv_cache, logits_to_keep=1)
    decode:   model(next_ids [B, 1], position_ids [B, 1], kv_cache, cache_position [1]) per step

Batches are left-padded (``attention_mask`` 0 on the padding); positions count only real tokens.
``Generator.generate_rows`` takes a ragged batch instead: one vision pass over every tile of the batch
(on CPU row by row), each prompt prefilled alone (no padding, the causal kernel) into its own row of one shared cache, then
one batched decode - the fast way to batch on CPU, where a padded prefill needs the masked kernel.
A row stops at any of ``stop_token_ids`` (the template's end-of-turn token and the tokenizer's eos),
or after ``max_new_tokens``. ``Generator.stream`` yields each step's tokens as they are produced;
``Generator.generate`` collects them.

On CUDA the KV cache is static with ``full_attention`` (every decode step has the same shapes) and the
decode step is captured once per (batch, cache length) in a CUDA graph and replayed; the prefill still
attends only the prompt's slots (a fused causal kernel unless rows are padded). On CPU the decode
step runs eagerly under ``torch.inference_mode``; ``optimize_for_cpu`` (applied by ``ChatModel`` on CPU)
runs bf16 linear layers on oneDNN-prepacked weights (large) or fp32 copies (small), which makes batch-1
bf16 matrix-vector products several times faster than the default kernel.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from numbers import Integral, Real

import torch
import torch.nn.functional as F
from torch import nn

from interleaf.errors import InputError
from interleaf.model.cache import KVCache

# ----------------------------------------------------------------------------------------------------
# configuration and sampling


@dataclass
class GenerationConfig:
    """How to generate.

    ``do_sample=False`` (or ``temperature == 0``) is greedy. Sampling applies temperature, then top-k
    (0 = off), then top-p (1.0 = off), like transformers' logits warpers; the defaults are those of
    transformers' ``generate`` (top-k 50), so ``do_sample=True`` alone samples as it does. With
    ``seed`` sampling is reproducible: on the CPU the very tokens ``generate`` draws after
    ``torch.manual_seed(seed)``. Stop tokens are suppressed for the first ``min_new_tokens`` steps
    (transformers' ``min_new_tokens``); ``ignore_eos`` disables stopping altogether (benchmarks on
    random weights).
    """

    max_new_tokens: int = 256
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 50
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        # wrong types failed deep in torch (topk, manual_seed, the cache's shape), NaN at the first draw
        for name in ("max_new_tokens", "min_new_tokens", "top_k", "pad_token_id", "seed"):
            value = getattr(self, name)
            if name == "seed" and value is None:
                continue
            if not isinstance(value, Integral) or isinstance(value, bool):
                raise InputError(f"{name} must be an int, got {value!r:.40}")
        for name in ("temperature", "top_p"):
            value = getattr(self, name)
            if not isinstance(value, Real) or isinstance(value, bool) or math.isnan(value):
                raise InputError(f"{name} must be a number, got {value!r:.40}")
        if self.min_new_tokens < 0:
            raise InputError(f"min_new_tokens must be >= 0, got {self.min_new_tokens}")
        if self.max_new_tokens < 0:
            raise InputError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise InputError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InputError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InputError(f"top_k must be >= 0, got {self.top_k}")
        self.stop_token_ids = tuple(int(t) for t in self.stop_token_ids)

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0


GENERATION_KEYS = {f for f in GenerationConfig.__dataclass_fields__}


def sample_next(
    logits: torch.Tensor, cfg: GenerationConfig, generator: torch.Generator | None
) -> torch.Tensor:
    """Pick the next token of each row. logits [B, V] -> ids [B] (long)."""
    if cfg.greedy:
        return logits.argmax(dim=-1)
    probs = warp_logits(logits, cfg).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def warp_logits(logits: torch.Tensor, cfg: GenerationConfig) -> torch.Tensor:
    """The fp32 logits [B, V] a sampling step draws from (softmax): temperature, top-k and top-p applied
    as transformers' ``TemperatureLogitsWarper``, ``TopKLogitsWarper`` and ``TopPLogitsWarper`` do
    (the same tensors, filtered tokens at -inf).

    A temperature so small that ``logits / temperature`` overflows (transformers' sampling fails there
    on an inf/nan probability) gives its limit instead: all the mass on the row's most likely token.
    """
    raw = logits.float()
    logits = raw / cfg.temperature
    if cfg.temperature < 1:  # (from finite logits, only a division by less than 1 overflows)
        top = raw.argmax(dim=-1, keepdim=True)
        over = ~logits.gather(-1, top).isfinite()  # [B, 1] (-inf too: every logit negative)
        limit = torch.full_like(logits, float("-inf")).scatter_(-1, top, 0.0)
        logits = torch.where(over, limit, logits)
    if cfg.top_k > 0:
        k = min(cfg.top_k, logits.shape[-1])
        kth = torch.topk(logits, k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=False)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cum <= 1 - cfg.top_p
        drop[:, -1] = False  # always keep the most likely token
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return logits


@dataclass
class GenerationOutput:
    """``tokens[i]``: the new tokens of row i, without the stop token; ``finish_reasons[i]``: "stop"
    or "length"; timings in seconds (``ttft``: prefill + first token)."""

    tokens: list[list[int]]
    finish_reasons: list[str]
    ttft: float = 0.0
    decode_time: float = 0.0
    num_decode_steps: int = 0
    stats: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------
# CPU: faster linear layers for inference
#
# The default bf16 CPU kernel is slow for the matrix-vector products of decoding. Large weights are
# prepacked for oneDNN (bandwidth-bound, close to the memory limit); small ones (where oneDNN's fixed
# per-call cost dominates) get an fp32 copy and run through the fp32 kernel, which has almost none.
# Both accumulate in fp32 like the bf16 kernel and return bf16. Large fp32 weights are prepacked too:
# the default fp32 kernel moves them at half oneDNN's rate for one or a few rows (2-2.9x slower at a
# 1B shape on an AVX-512 EPYC; 10% slower for a 459-token prefill); small fp32 layers stay as they are.

PACK_MIN_NUMEL = 1 << 19  # weights below 512K elements (1 MiB in bf16) use the fp32 copy


def _prepare(
    weight: torch.Tensor, bias: torch.Tensor | None
) -> tuple[str, torch.Tensor, torch.Tensor | None]:
    with torch.no_grad():
        if weight.numel() >= PACK_MIN_NUMEL:
            return "packed", torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1), bias
        return "fp32", weight.detach().float(), None if bias is None else bias.detach().float()


def _fast_forward(module: nn.Linear) -> Callable:
    """A forward on a prepared weight that notices when the weight is replaced or changed in place."""
    linear_pointwise = torch.ops.mkldnn._linear_pointwise
    w0, b0 = module.weight, module.bias

    def key():
        w, b = module.weight, module.bias
        return (id(w), w._version, id(b), None if b is None else b._version)

    state = {"key": key(), "prepared": _prepare(w0, b0)}

    def forward(x: torch.Tensor) -> torch.Tensor:
        w = module.weight
        if (
            x.dtype != w.dtype
            or w.device.type != "cpu"
            or (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))
        ):
            return F.linear(x, w, module.bias)  # training / other dtype or device: the plain path
        k = key()
        if k != state["key"]:  # weights changed: prepare again
            state.update(key=k, prepared=_prepare(w, module.bias))
        kind, weight, bias = state["prepared"]
        if kind == "packed":
            return linear_pointwise(x, weight, module.bias, "none", [], "")
        return F.linear(x.float(), weight, bias).to(x.dtype)

    return forward


def optimize_for_cpu(
    model: nn.Module, dtypes: Sequence[torch.dtype] = (torch.bfloat16, torch.float32)
) -> int:
    """Speed up the model's bf16 and large fp32 linear layers on CPU for inference (returns how many).

    Each plain ``nn.Linear`` of ``model`` (ViT, projector and LLM) whose weight is in ``dtypes`` (fp32
    ones only from ``PACK_MIN_NUMEL`` elements) keeps its parameter (state_dict, training and saving are
    untouched) and gets an instance-level ``forward`` on a prepared copy of the weight
    (oneDNN-prepacked when large, fp32 when small; prepared again if the weight changes; the plain path
    is used whenever gradients are needed). Costs one extra copy of those weights in memory.
    :func:`restore_cpu_linears` undoes it. Does nothing without oneDNN.
    """
    if not (hasattr(torch.ops.mkldnn, "_reorder_linear_weight") and torch.backends.mkldnn.is_available()):
        return 0
    count = 0
    for module in model.modules():
        if type(module) is not nn.Linear or getattr(module, "_interleaf_packed", False):
            continue
        if module.weight.device.type != "cpu" or module.weight.dtype not in dtypes:
            continue
        if module.weight.dtype == torch.float32 and module.weight.numel() < PACK_MIN_NUMEL:
            continue  # already the fp32 kernel, which suits small layers
        try:
            module.forward = _fast_forward(module)
        except RuntimeError:
            return count
        module._interleaf_packed = True
        count += 1
    return count


def restore_cpu_linears(model: nn.Module) -> None:
    """Undo :func:`optimize_for_cpu`."""
    for module in model.modules():
        if getattr(module, "_interleaf_packed", False):
            del module.forward
            del module._interleaf_packed


# ----------------------------------------------------------------------------------------------------
# CUDA graph of one decode step


class _GraphedDecodeStep:
    """A captured decode step for a fixed (batch, cache length); inputs are copied into static buffers.

    On CUDA the step is captured once and replayed; elsewhere (tests on CPU) the very same function
    on the same static buffers runs eagerly, so everything but the capture itself is exercised there.
    """

    def __init__(self, model: nn.Module, cache, mask: torch.Tensor, first_slot: int) -> None:
        b = mask.shape[0]
        device = mask.device
        self.ids = torch.zeros(b, 1, dtype=torch.long, device=device)
        self.pos = torch.zeros(b, 1, dtype=torch.long, device=device)
        self.slot = torch.full((1,), first_slot, dtype=torch.long, device=device)
        self.mask = torch.ones(b, cache.max_len, dtype=torch.long, device=device)
        self.mask.copy_(mask)
        self.model, self.cache = model, cache

        def run() -> torch.Tensor:
            return model(
                input_ids=self.ids, attention_mask=self.mask, position_ids=self.pos,
                kv_cache=cache, cache_position=self.slot, logits_to_keep=1,
            ).logits[:, -1]  # fmt: skip

        self._run, self.graph = run, None
        if device.type != "cuda":
            return
        stream = torch.cuda.Stream(device=device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm up (allocations, lazy inits) outside the graph
                run()
        torch.cuda.current_stream(device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = run()

    def set_mask(self, mask: torch.Tensor) -> None:
        self.mask.copy_(mask)

    def __call__(self, ids: torch.Tensor, pos: torch.Tensor, slot: int) -> torch.Tensor:
        self.ids.copy_(ids.view_as(self.ids))
        self.pos.copy_(pos.view_as(self.pos))
        self.slot.fill_(slot)
        if self.graph is None:
            return self._run()
        self.graph.replay()
        return self.logits


# ----------------------------------------------------------------------------------------------------
# the engine


def _inference_steps(steps: Iterator[torch.Tensor]) -> Iterator[torch.Tensor]:
    """Advance ``steps`` under ``torch.inference_mode`` but hand each item over outside it.

    A grad-mode context held across a ``yield`` leaks into the caller between steps, and two
    interleaved streams would restore each other's saved mode in the wrong order (leaving grad
    disabled for whatever runs next in the thread).
    """
    try:
        while True:
            with torch.inference_mode():
                try:
                    item = next(steps)
                except StopIteration:
                    return
            yield item
    finally:
        steps.close()


def left_pad(rows: Sequence[Sequence[int] | torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of different lengths as one left-padded batch: ``(input_ids [B, S], attention_mask [B, S])``."""
    rows = [torch.as_tensor(r, dtype=torch.long).reshape(-1) for r in rows]
    width = max(r.numel() for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, width - r.numel() :] = r
        mask[i, width - r.numel() :] = 1
    return input_ids, mask


def decode_steps(
    logits: torch.Tensor,
    step: Callable[[torch.Tensor, int], torch.Tensor],
    cfg: GenerationConfig,
    record: GenerationOutput | None,
    t0: float,
) -> Iterator[torch.Tensor]:
    """The decode loop of every engine: pick each step's tokens from ``logits`` [B, V], yield them (CPU
    LongTensor [B], finished rows ``pad_token_id``) and get the next logits from ``step(next_ids [B],
    i)``, until every row stopped or ``max_new_tokens``; fills ``record`` (tokens, finish reasons,
    timings from ``t0``) when given."""
    device = logits.device
    generator = None
    if not cfg.greedy and cfg.seed is not None:
        generator = torch.Generator(device=device).manual_seed(cfg.seed)
    b = logits.shape[0]
    stop_ids = torch.tensor(() if cfg.ignore_eos else cfg.stop_token_ids, dtype=torch.long, device=device)
    finished = torch.zeros(b, dtype=torch.bool, device=device)
    done_host = [False] * b
    tokens: list[list[int]] = [[] for _ in range(b)]
    ttft = 0.0
    t_decode = None
    for i in range(cfg.max_new_tokens):
        if i < cfg.min_new_tokens and stop_ids.numel():
            logits = logits.index_fill(-1, stop_ids, float("-inf"))
        nxt = sample_next(logits, cfg, generator)
        if stop_ids.numel():
            nxt = nxt.masked_fill(finished, cfg.pad_token_id)
            hit = torch.isin(nxt, stop_ids) & ~finished
            finished |= hit
        nxt_cpu = nxt.cpu()  # the one host sync per step
        host = nxt_cpu.tolist()
        if i == 0:
            ttft = time.perf_counter() - t0
            t_decode = time.perf_counter()
        for r in range(b):
            if done_host[r]:
                continue
            if not cfg.ignore_eos and host[r] in cfg.stop_token_ids:
                done_host[r] = True
            else:
                tokens[r].append(host[r])
        yield nxt_cpu
        if all(done_host) or i == cfg.max_new_tokens - 1:
            break
        logits = step(nxt, i)
    if record is not None:
        record.tokens = tokens
        record.finish_reasons = ["stop" if d else "length" for d in done_host]
        record.ttft = ttft
        n_steps = max(len(t) for t in tokens) if tokens else 0
        record.num_decode_steps = max(0, n_steps - 1)
        record.decode_time = (time.perf_counter() - t_decode) if t_decode is not None else 0.0


class StepGenerator:
    """What every engine offers on top of its loop: :meth:`generate` collects what :meth:`stream` yields.
    A subclass implements ``_run(input_ids, attention_mask, pixel_values, config, record)``, an iterator
    of each step's tokens that fills ``record`` (a :class:`GenerationOutput`) when given."""

    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        config: GenerationConfig | None = None,
        callback: Callable[[torch.Tensor], None] | None = None,
        **kwargs,
    ) -> GenerationOutput:
        """Generate for a (left-padded) batch and return the new tokens of each row.

        Args:
            input_ids: [B, S] prompt ids (left padding).
            attention_mask: [B, S] 1 = token, 0 = padding (default: all ones).
            pixel_values: [N_tiles, 3, H, W] for the ``<IMG_CONTEXT>`` positions, or None.
            config: a :class:`GenerationConfig`; keyword arguments override its fields.
            callback: called with each step's tokens [B] (finished rows get ``pad_token_id``).
        """
        config = merge_config(config, kwargs)
        out = GenerationOutput(tokens=[[] for _ in range(input_ids.shape[0])], finish_reasons=[])
        steps = self.stream(input_ids, attention_mask, pixel_values, config, _timing=out)
        for step_tokens in steps:
            if callback is not None:
                callback(step_tokens)
        return out

    def stream(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        config: GenerationConfig | None = None,
        _timing: GenerationOutput | None = None,
        **kwargs,
    ) -> Iterator[torch.Tensor]:
        """Like :meth:`generate`, but yield each step's tokens (CPU LongTensor [B]) as produced.

        Finished rows yield ``pad_token_id``; the iteration ends when every row has stopped.
        """
        config = merge_config(config, kwargs)
        return _inference_steps(self._run(input_ids, attention_mask, pixel_values, config, _timing))

    def stream_padded(
        self,
        rows: Sequence[Sequence[int] | torch.Tensor],
        pixel_values: Sequence[torch.Tensor | None] | None = None,
        config: GenerationConfig | None = None,
        _timing: GenerationOutput | None = None,
        **kwargs,
    ) -> Iterator[torch.Tensor]:
        """:meth:`stream` for prompts of different lengths (ids, no padding), left-padded into one batch;
        ``pixel_values[r]``: row r's tiles [N_r, 3, H, W] or None."""
        config = merge_config(config, kwargs)
        input_ids, mask = left_pad(rows, config.pad_token_id)
        tiles = [px for px in (pixel_values or []) if px is not None]
        return self.stream(input_ids, mask, torch.cat(tiles) if tiles else None, config, _timing=_timing)

    def stream_rows(
        self,
        rows: Sequence[Sequence[int] | torch.Tensor],
        pixel_values: Sequence[torch.Tensor | None] | None = None,
        config: GenerationConfig | None = None,
        _timing: GenerationOutput | None = None,
        **kwargs,
    ) -> Iterator[torch.Tensor]:
        """Prompts of different lengths, each step's tokens as produced; an engine without a row-wise
        prefill (:class:`Generator` has one) pads them (:meth:`stream_padded`)."""
        if any(len(r) == 0 for r in rows):
            raise InputError("generate_rows: an empty prompt")
        return self.stream_padded(rows, pixel_values, config, _timing=_timing, **kwargs)

    def _run(
        self, input_ids, attention_mask, pixel_values, cfg: GenerationConfig, record
    ) -> Iterator[torch.Tensor]:
        raise NotImplementedError


class Generator(StepGenerator):
    """Generation on an ``InternVLChatModel`` (or any model with the same forward and ``make_cache``).

    Args:
        model: the model, already on its device and dtype.
        cuda_graphs: capture the decode step in a CUDA graph (default: when the model is on CUDA).
        static_cache: keep one reusable full-length cache per (batch, length bucket) and attend over the
            whole buffer with a mask, so every decode step has the same shapes (default: with graphs).

    ``batch_vision`` (attribute): :meth:`generate_rows` runs the vision encoder once over the whole
    batch's tiles (default off the CPU) instead of row by row.
    """

    def __init__(
        self, model: nn.Module, cuda_graphs: bool | None = None, static_cache: bool | None = None
    ) -> None:
        self.model = model
        dev = next(model.parameters()).device
        self.device = dev
        on_cuda = dev.type == "cuda"
        self.cuda_graphs = on_cuda if cuda_graphs is None else bool(cuda_graphs) and on_cuda
        self.static_cache = (
            self.cuda_graphs if static_cache is None else bool(static_cache) or self.cuda_graphs
        )
        self.batch_vision = dev.type != "cpu"  # generate_rows: one ViT pass over the batch's tiles
        self._caches: dict[tuple[int, int], object] = {}
        self._graphs: dict[tuple[int, int], _GraphedDecodeStep] = {}
        self._busy: set[tuple[int, int]] = set()  # static caches in use by a running generation

    # -------------------------------------------------------------- cache management
    def _cache_len(self, needed: int) -> int:
        # bucket lengths on CUDA so graphs and caches are reused across calls
        return -(-needed // 256) * 256 if self.static_cache else needed

    def _get_cache(self, batch: int, max_len: int):
        """``(cache, shared)``: the reusable static cache for this shape when it is free, else a new one."""
        key = (batch, max_len)
        shared = self.static_cache and key not in self._busy
        cache = self._caches.get(key) if shared else None
        if cache is None:
            dtype = next(self.model.parameters()).dtype
            cache = self.model.make_cache(batch, max_len, dtype=dtype, device=self.device)
            cache.full_attention = self.static_cache
            if shared:
                if len(self._caches) >= 4 and not self._busy:  # keep GPU memory bounded
                    self._caches.clear()
                    self._graphs.clear()
                self._caches[key] = cache
        cache.reset()
        return cache, shared

    # -------------------------------------------------------------- the loop
    def _run(self, input_ids, attention_mask, pixel_values, cfg: GenerationConfig, record):
        model, device = self.model, self.device
        if input_ids.dim() != 2:
            raise InputError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        b, s = input_ids.shape
        input_ids = input_ids.to(device)
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device).long()
        if pixel_values is not None:
            pixel_values = pixel_values.to(device=device, dtype=next(model.parameters()).dtype)
        padded = bool((mask == 0).any())
        if cfg.max_new_tokens == 0:
            if record is not None:
                record.finish_reasons = ["length"] * b
            return

        t0 = time.perf_counter()
        max_len = self._cache_len(s + cfg.max_new_tokens)
        cache, shared = self._get_cache(b, max_len)
        if shared:  # two interleaved streams must not share one buffer
            self._busy.add((b, max_len))
        try:
            yield from self._loop(input_ids, mask, pixel_values, cfg, record, cache, shared, t0, padded)
        finally:
            if shared:
                self._busy.discard((b, max_len))

    def _loop(self, input_ids, mask, pixel_values, cfg, record, cache, shared, t0, padded):
        model, device = self.model, self.device
        b, s = input_ids.shape
        max_len = cache.max_len
        n_valid = mask.sum(-1, keepdim=True)  # [B, 1]: the first generated token's position
        # the prefill fills slots [0, s) of the empty cache and attends only those (no cache_position:
        # even a static cache then takes the causal kernel unless rows are padded); the decode steps
        # below pass their slots and, with a static cache, attend the whole buffer
        logits = model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=mask if padded else None,
            kv_cache=cache,
            logits_to_keep=1,
        ).logits[:, -1]

        graphed = None
        if self.cuda_graphs and shared and cfg.max_new_tokens > 1:
            key = (b, max_len)
            full_mask = torch.ones(b, max_len, dtype=torch.long, device=device)
            full_mask[:, :s] = mask
            graphed = self._graphs.get(key)
            if graphed is None:
                try:
                    graphed = _GraphedDecodeStep(model, cache, full_mask, s)
                    self._graphs[key] = graphed
                except Exception as exc:  # noqa: BLE001 - fall back to eager decoding
                    warnings.warn(f"CUDA graph capture failed, decoding eagerly: {exc}", stacklevel=2)
                    self.cuda_graphs = False
            else:
                graphed.set_mask(full_mask)
        step_mask = mask if padded else None
        if cache.full_attention and graphed is None:
            step_mask = torch.ones(b, max_len, dtype=torch.long, device=device)
            step_mask[:, :s] = mask

        if graphed is not None:

            def step(nxt: torch.Tensor, i: int) -> torch.Tensor:
                return graphed(nxt, n_valid + i, s + i)

        else:
            step = self._eager_step(cache, step_mask, n_valid, s)
        yield from decode_steps(logits, step, cfg, record, t0)

    def _eager_step(
        self, cache: KVCache, mask: torch.Tensor | None, positions: torch.Tensor, first_slot: int
    ):
        """``step(next_ids [B], i)`` -> logits [B, V]: one eager decode step at ``positions + i``, written
        to cache slot ``first_slot + i``."""

        def step(nxt: torch.Tensor, i: int) -> torch.Tensor:
            return self.model(
                input_ids=nxt[:, None],
                attention_mask=mask,
                position_ids=positions + i,
                kv_cache=cache,
                cache_position=torch.tensor([first_slot + i], device=self.device),
                logits_to_keep=1,
            ).logits[:, -1]

        return step

    # -------------------------------------------------------------- ragged batches
    def generate_rows(
        self,
        rows: Sequence[Sequence[int] | torch.Tensor],
        pixel_values: Sequence[torch.Tensor | None] | None = None,
        config: GenerationConfig | None = None,
        **kwargs,
    ) -> GenerationOutput:
        """Generate for prompts of different lengths without padding them.

        All tiles of the batch go through the vision encoder in one call (on CPU: row by row); each
        prompt is prefilled alone (plain causal attention, no padding) into row ``r`` of one shared cache,
        at slots ``[0, len_r)``, and the rows decode together from slot ``max(len)`` on, the gap
        masked. Greedy, each row gets the tokens it gets alone (up to float rounding in the batched
        decode steps); sampling draws for the whole batch, as a padded batch does.

        Args:
            rows: B prompts, each a list / 1-D tensor of ids (no padding).
            pixel_values: per row [N_tiles_r, 3, H, W] or None (default: no images).
            config: a :class:`GenerationConfig`; keyword arguments override its fields.
        """
        config = merge_config(config, kwargs)
        out = GenerationOutput(tokens=[[] for _ in rows], finish_reasons=[])
        for _ in self.stream_rows(rows, pixel_values, config, _timing=out):
            pass
        return out

    def stream_rows(
        self,
        rows: Sequence[Sequence[int] | torch.Tensor],
        pixel_values: Sequence[torch.Tensor | None] | None = None,
        config: GenerationConfig | None = None,
        _timing: GenerationOutput | None = None,
        **kwargs,
    ) -> Iterator[torch.Tensor]:
        """Like :meth:`generate_rows`, but yield each step's tokens (CPU LongTensor [B]) as produced
        (finished rows yield ``pad_token_id``), as :meth:`stream` does for a padded batch."""
        config = merge_config(config, kwargs)
        return _inference_steps(self._run_rows(rows, pixel_values, config, _timing))

    def row_batch(
        self, rows: int, start: int, slots: int, config: GenerationConfig | None = None, **kwargs
    ) -> RowBatch:
        """A :class:`RowBatch`: ``rows`` requests at once, joining and leaving between steps; the first
        decode step writes slot ``start`` (at least the longest prompt to admit first), the last
        ``slots - 1``. Sampling follows ``config``; stopping is the caller's (``config``'s stop tokens,
        ``min_new_tokens`` and ``ignore_eos`` are not applied)."""
        return RowBatch(self, rows, start, slots, merge_config(config, kwargs))

    def _run_rows(self, rows, pixel_values, cfg: GenerationConfig, record):
        model, device = self.model, self.device
        b = len(rows)
        if b == 0:
            return
        pixel_values = [None] * b if pixel_values is None else list(pixel_values)
        if len(pixel_values) != b:
            raise InputError(f"generate_rows: {b} rows but {len(pixel_values)} pixel_values entries")
        ids = [torch.as_tensor(r, dtype=torch.long).reshape(-1).to(device) for r in rows]
        lens = [int(r.numel()) for r in ids]
        if min(lens) == 0:
            raise InputError("generate_rows: an empty prompt")
        if cfg.max_new_tokens == 0:
            if record is not None:
                record.finish_reasons = ["length"] * b
            return
        t0 = time.perf_counter()
        dtype = next(model.parameters()).dtype
        # Vision: on an accelerator one pass over every tile of the batch (fills the device); on CPU
        # row by row inside each prefill, which is faster there (measured: a 25-tile pass is ~15%
        # slower than 8 small ones - its activations fall out of cache - plus a 60 MB concatenation).
        extra: list[dict] = [{} for _ in range(b)]
        with_px = [r for r in range(b) if pixel_values[r] is not None]
        if with_px:
            pixels = [pixel_values[r].to(device=device, dtype=dtype) for r in with_px]
            if self.batch_vision and hasattr(model, "extract_feature"):
                feats = model.extract_feature(torch.cat(pixels)).split([p.shape[0] for p in pixels])
                for r, f in zip(with_px, feats):
                    extra[r] = {"image_embeds": f}
            else:
                for r, p in zip(with_px, pixels):
                    extra[r] = {"pixel_values": p}
        width = max(lens)
        cache = model.make_cache(b, width + cfg.max_new_tokens, dtype=dtype, device=device)
        firsts = []
        for r in range(b):
            firsts.append(
                model(
                    input_ids=ids[r][None],
                    kv_cache=_row_view(cache, r),
                    cache_position=torch.arange(lens[r], device=device),
                    logits_to_keep=1,
                    **extra[r],
                ).logits[:, -1]
            )
        logits = torch.cat(firsts)
        # slots [len_r, width) of row r are the gap: masked in every decode step
        mask = torch.ones(b, width + cfg.max_new_tokens, dtype=torch.long, device=device)
        for r in range(b):
            mask[r, lens[r] : width] = 0
        step_mask = mask if min(lens) < width else None
        positions = torch.tensor(lens, device=device)[:, None]  # [B, 1]

        step = self._eager_step(cache, step_mask, positions, width)
        yield from decode_steps(logits, step, cfg, record, t0)


# ----------------------------------------------------------------------------------------------------
# continuous batching


class RowBatch:
    """A decode batch that requests join and leave between steps (continuous batching).

    The batch has ``rows`` cache rows of ``slots`` key/value slots each, and every row writes its
    next token's keys/values at one shared slot ``t`` per step. A request joins a free row with its
    prompt prefilled alone into that row's slots ``[0, P)`` (as :meth:`Generator.generate_rows` does);
    the slots between its prompt and ``t`` (stale or another request's) are masked for it, and it
    must end before the last slot (``t + max_new_tokens <= slots``). A prompt longer than ``t`` moves
    ``t`` up to its length: the slots skipped become a masked gap for the rows already running (their
    positions do not move), if every one of them still ends before the last slot. Greedy, a row gets
    the tokens it gets alone (up to float rounding), whoever joins or leaves beside it.

    Use (in the caller's loop; stop tokens, lengths and stop strings are the caller's to judge)::

        batch = generator.row_batch(rows=8, start=max_prompt_len, slots=..., config=cfg)
        r = batch.admit(ids, pixel_values, max_new_tokens)  # prefill; its first token: next sample()
        while batch.active:
            for r, token in batch.sample().items():   # one token for every active row
                ...                                   # batch.release(r) when row r is done
            batch.advance()                     # feed the sampled tokens: one decode step
            ...                                 # admit more rows (between advance and sample)
        batch.close()

    On CUDA the decode step is a CUDA graph over all rows (static shapes; the generator's static cache
    and graph for ``(rows, slots)`` are reused); on the CPU it runs eagerly over the rows up to the
    last active one, so a lone request does not pay for the idle rows.
    """

    def __init__(self, generator: Generator, rows: int, start: int, slots: int, config: GenerationConfig):
        if not 1 <= start < slots:
            raise InputError(f"row_batch: start slot {start} must be in [1, slots={slots})")
        self.generator, self.config = generator, config
        model, device = generator.model, generator.device
        self.device = device
        self.slots = generator._cache_len(slots)
        self.cache, self._shared = generator._get_cache(rows, self.slots)
        self._key = (rows, self.slots)
        if self._shared:
            generator._busy.add(self._key)
        self.t = start  # the slot the next decode step writes
        self.mask = torch.ones(rows, self.slots, dtype=torch.long, device=device)
        self.positions = torch.zeros(rows, 1, dtype=torch.long, device=device)
        # 1 for active rows: only their positions advance; an idle row's is 0. Longrope and dynamic-NTK
        # RoPE pick every row's frequencies by the batch's largest position, idle rows' included.
        self.live = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.tokens = torch.full((rows,), config.pad_token_id, dtype=torch.long, device=device)
        self.logits: torch.Tensor | None = None  # [rows, V]: what each row samples from next
        self.ends: dict[int, int] = {}  # active row -> the slot count it needs (t at admission + its tokens)
        self._graphed = None
        if generator.cuda_graphs and self._shared:
            self._graphed = generator._graphs.get(self._key)
            try:
                if self._graphed is None:
                    with torch.inference_mode():  # as in _loop: the same step serves both
                        self._graphed = _GraphedDecodeStep(model, self.cache, self.mask, start)
                    generator._graphs[self._key] = self._graphed
            except Exception as exc:  # noqa: BLE001 - fall back to eager decoding
                warnings.warn(f"CUDA graph capture failed, decoding eagerly: {exc}", stacklevel=2)
                generator.cuda_graphs, self._graphed = False, None
        self._sampler = None
        if not config.greedy and config.seed is not None:
            self._sampler = torch.Generator(device=device).manual_seed(config.seed)

    @property
    def rows(self) -> int:
        return self.mask.shape[0]

    @property
    def active(self) -> set[int]:
        """The rows generating now."""
        return set(self.ends)

    def can_admit(self, prompt_len: int, max_new_tokens: int) -> bool:
        """Whether a prompt of ``prompt_len`` tokens that may generate ``max_new_tokens`` joins now."""
        t = max(self.t, prompt_len)  # a longer prompt moves the write slot up to its length
        return (
            len(self.active) < self.rows
            and t + max_new_tokens <= self.slots
            and all(end + t - self.t <= self.slots for end in self.ends.values())
        )

    def admit(
        self,
        input_ids: Sequence[int] | torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        max_new_tokens: int | None = None,
    ) -> int:
        """Prefill a prompt into a free row; returns the row. Its first token comes at the next sample().

        ``max_new_tokens``: the most tokens the caller lets it generate (None: up to the last slot,
        and then no longer prompt may move the write slot while it runs).
        """
        ids = torch.as_tensor(input_ids, dtype=torch.long).reshape(-1).to(self.device)
        n = int(ids.numel())
        need = max(self.slots - max(self.t, n), 0) if max_new_tokens is None else max_new_tokens
        if not n or not self.can_admit(n, need):
            raise InputError(f"row_batch: a prompt of {n} tokens cannot join now (slot {self.t}, "
                             f"{len(self.active)}/{self.rows} rows busy)")  # fmt: skip
        r = min(set(range(self.rows)) - self.ends.keys())
        model = self.generator.model
        extra = {}
        if pixel_values is not None:
            extra["pixel_values"] = pixel_values.to(device=self.device, dtype=next(model.parameters()).dtype)
        with torch.inference_mode():
            logits = model(
                input_ids=ids[None], kv_cache=_row_view(self.cache, r),
                cache_position=torch.arange(n, device=self.device), logits_to_keep=1, **extra,
            ).logits[:, -1]  # fmt: skip
            if self.logits is None:
                self.logits = torch.zeros(self.rows, logits.shape[-1], dtype=logits.dtype, device=self.device)
            # only once its prefill succeeded (a failed one leaves the batch as it was, the graphed step's
            # mask included): skip the write slot ahead to the prompt's length, a masked gap for the others
            if n > self.t:
                self.mask[:, self.t : n] = 0
                self.ends = {row: end + n - self.t for row, end in self.ends.items()}
                self.t = n
            self.logits[r] = logits[0]
            self.mask[r] = 1
            self.mask[r, n : self.t] = 0  # between its prompt and its first token: not its keys
            self.positions[r] = n
            self.live[r] = 1
            if self._graphed is not None:  # (its buffers are inference tensors: written in inference mode)
                self._graphed.set_mask(self.mask)
        self.ends[r] = self.t + need
        return r

    def release(self, row: int) -> None:
        """Row ``row`` is done: it is no longer sampled nor fed, and a new request may take it."""
        self.ends.pop(row, None)
        self.live[row] = 0
        self.positions[row] = 0  # (see self.live)

    def sample(self) -> dict[int, int]:
        """The next token of every active row, ``{row: token}`` (each row's first: from its prefill)."""
        if not self.ends:
            return {}
        with torch.inference_mode():
            self.tokens = sample_next(self.logits, self.config, self._sampler)
        host = self.tokens.tolist()  # the one host sync per step
        return {r: host[r] for r in sorted(self.ends)}

    def advance(self) -> None:
        """Feed every active row the token sample() gave it: one decode step at slot ``t``."""
        if not self.ends:
            return
        if self.t >= self.slots:
            raise InputError(f"row_batch: all {self.slots} slots are used")
        with torch.inference_mode():
            if self._graphed is not None:
                logits = self._graphed(self.tokens, self.positions, self.t)
            else:
                hi = max(self.ends) + 1  # rows past the last active one sit out
                cache = self.cache if hi == self.rows else _rows_view(self.cache, 0, hi)
                step = self.generator._eager_step(cache, self.mask[:hi], self.positions[:hi], self.t)
                logits = step(self.tokens[:hi], 0)
            self.logits[: logits.shape[0]] = logits
            self.positions += self.live
        self.t += 1

    def close(self) -> None:
        """Give the generator's static cache back (a batch left open keeps it)."""
        if self._shared:
            self.generator._busy.discard(self._key)
            self._shared = False


def _rows_view(cache, start: int, stop: int):
    """Rows ``[start, stop)`` of ``cache`` as a cache sharing its buffers (writes land in the batch cache)."""
    view = copy.copy(cache)
    view.keys = [k[start:stop] for k in cache.keys]
    view.values = [v[start:stop] for v in cache.values]
    view.batch_size = stop - start
    return view


def _row_view(cache, row: int):
    """Row ``row`` of ``cache`` as an empty batch-1 cache for a prefill that attends just its prompt."""
    view = _rows_view(cache, row, row + 1)
    view.length, view.full_attention = 0, False
    return view


def merge_config(config: GenerationConfig | None, kwargs: dict) -> GenerationConfig:
    """``config`` (default: a fresh :class:`GenerationConfig`) with the fields in ``kwargs`` replaced;
    unknown options are an error naming them."""
    unknown = set(kwargs) - GENERATION_KEYS
    if unknown:
        raise InputError(f"unknown generation option(s): {', '.join(sorted(unknown))}")
    config = config or GenerationConfig()
    return replace(config, **kwargs) if kwargs else config
