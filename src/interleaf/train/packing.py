"""Sample streams, packing and collation.

``SampleStream`` walks a dataset epoch by epoch in a seeded order (sharded across ranks), skipping bad
samples. ``Batcher`` groups samples into rows: one sample per row, or, with packing, several samples
greedily packed up to a token and an image (tile) budget, as upstream's ``PackedDataset`` does. Both
expose ``state_dict`` so that a resumed run sees exactly the batches an uninterrupted run would.

``collate`` turns rows into tensors: position ids restart at 0 for every sample, the attention mask is
block-diagonal causal (a 4-D bool mask, True = attend), and each supervised token carries a loss
weight for the chosen reduction (upstream's ``loss_reduction``):

* ``token``: 1 (plain token mean over the micro-batch),
* ``sample``: 1/n (every sample counts equally, n = its supervised tokens),
* ``square``: 1/sqrt(n) (in between);

the loss is ``sum(w * CE) / sum(w)``.
"""

from __future__ import annotations

import math
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from interleaf.errors import InterleafError
from interleaf.train.data import IGNORE_INDEX, Sample


class SampleStream:
    """Endless, seeded, resumable walk over a dataset (``dataset.get(i, epoch) -> Sample | None``).

    With ``workers`` > 0, threads build the epoch's next samples ahead of time (image decoding and
    tiling release the GIL, so a GPU step no longer waits for them) and hand them over in order: the
    stream yields exactly what it yields without them. Skips found while reading ahead are recorded
    in ``skip_log`` only when the sample is consumed, so a checkpoint counts exactly what it used.
    """

    def __init__(
        self,
        dataset: Any,
        seed: int = 42,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        workers: int = 0,
        skip_log: Any = None,
    ):
        if len(dataset) == 0:
            raise InterleafError("training data: the dataset has no samples")
        self.dataset = dataset
        self.seed = seed
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.cursor = 0
        self._order: list[int] | None = None
        self._good_this_epoch = 0
        self.workers = workers
        self.depth = 8 * workers  # samples read ahead (each holds its tiles in memory)
        self.skip_log = skip_log if skip_log is not None else getattr(dataset, "skip_log", None)
        self._ahead: deque[tuple[int, Future]] = deque()  # (position in the epoch's order, result)
        self._pool: ThreadPoolExecutor | None = None

    def _epoch_order(self) -> list[int]:
        if self._order is None:
            n = len(self.dataset)
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed + self.epoch)
                order = torch.randperm(n, generator=g).tolist()
            else:
                order = list(range(n))
            self._order = order[self.rank :: self.world_size]
        return self._order

    def next(self) -> tuple[int, int, Sample]:
        """(epoch, index, sample) of the next usable sample."""
        while True:
            order = self._epoch_order()
            if self.cursor >= len(order):
                if self._good_this_epoch == 0:
                    raise InterleafError(
                        "training data: every sample was skipped (see the skip log for reasons)"
                    )
                self.epoch += 1
                self.cursor = 0
                self._order = None
                self._good_this_epoch = 0
                continue
            idx = order[self.cursor]
            sample = self._get(order, self.cursor) if self.workers > 0 else self.dataset.get(idx, self.epoch)
            self.cursor += 1
            if sample is not None:
                self._good_this_epoch += 1
                return self.epoch, idx, sample

    def _fetch(self, idx: int, epoch: int) -> tuple[Any, list]:
        if self.skip_log is None:
            return self.dataset.get(idx, epoch), []
        with self.skip_log.deferred() as skipped:
            sample = self.dataset.get(idx, epoch)
        return sample, skipped

    def _get(self, order: list[int], pos: int) -> Any:
        """The sample at ``pos`` of this epoch's order, keeping ``depth`` positions in flight."""
        if self._ahead and self._ahead[0][0] != pos:
            self._drop_ahead()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="interleaf-data")
        nxt = self._ahead[-1][0] + 1 if self._ahead else pos
        while len(self._ahead) < self.depth and nxt < len(order):
            self._ahead.append((nxt, self._pool.submit(self._fetch, order[nxt], self.epoch)))
            nxt += 1
        sample, skipped = self._ahead.popleft()[1].result()
        if self.skip_log is not None:
            self.skip_log.replay(skipped)
        return sample

    def _drop_ahead(self) -> None:
        for _, fut in self._ahead:
            fut.cancel()
        self._ahead.clear()

    def close(self) -> None:
        """Stop the read-ahead workers (a closed stream still works, without them)."""
        self._drop_ahead()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self.workers = 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor, "good": self._good_this_epoch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._drop_ahead()
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self._good_this_epoch = int(state.get("good", 1))
        self._order = None


class Batcher:
    """Rows of samples: one per row, or packed up to ``max_tokens`` tokens and ``max_images`` tiles.

    Packing is greedy over the stream with up to ``lookahead`` samples waiting for a later row when
    they do not fit the current one (so rows fill up well without reordering much).
    """

    def __init__(
        self,
        stream: SampleStream,
        batch_size: int = 1,
        packing: bool = False,
        max_tokens: int = 4096,
        max_images: int = 48,
        lookahead: int = 8,
    ):
        self.stream = stream
        self.batch_size = batch_size
        self.packing = packing
        self.max_tokens = max_tokens
        self.max_images = max_images
        self.lookahead = max(1, lookahead)
        self.pending: list[tuple[int, int, Sample]] = []

    def _row(self) -> list[Sample]:
        if not self.packing:
            if self.pending:
                return [self.pending.pop(0)[2]]
            return [self.stream.next()[2]]
        row: list[Sample] = []
        tokens = images = 0

        def fits(s: Sample) -> bool:
            if not row:  # a lone sample always gets its own row
                return True
            return tokens + s.num_tokens <= self.max_tokens and images + s.num_images <= self.max_images

        keep = []
        for item in self.pending:
            if fits(item[2]):
                row.append(item[2])
                tokens += item[2].num_tokens
                images += item[2].num_images
            else:
                keep.append(item)
        self.pending = keep
        while len(self.pending) < self.lookahead and tokens < self.max_tokens:
            item = self.stream.next()
            if fits(item[2]):
                row.append(item[2])
                tokens += item[2].num_tokens
                images += item[2].num_images
            else:
                self.pending.append(item)
        return row

    def next_batch(self) -> list[list[Sample]]:
        return [self._row() for _ in range(self.batch_size)]

    def state_dict(self) -> dict[str, Any]:
        return {"stream": self.stream.state_dict(), "pending": [(e, i) for e, i, _ in self.pending]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stream.load_state_dict(state["stream"])
        self.pending = []
        for epoch, idx in state["pending"]:
            sample = self.stream.dataset.get(idx, epoch)
            if sample is not None:
                self.pending.append((epoch, idx, sample))


def block_causal_mask(lengths: list[list[int]], seq_len: int) -> torch.Tensor:
    """Bool [B, 1, S, S]: position q attends to k iff both are in the same sample and k <= q.

    Padding positions attend to themselves only (keeps softmax finite; their loss weight is 0).
    """
    B = len(lengths)
    seg = torch.full((B, seq_len), -1, dtype=torch.long)
    for b, lens in enumerate(lengths):
        start = 0
        for k, n in enumerate(lens):
            seg[b, start : start + n] = k
            start += n
        seg[b, start:] = torch.arange(len(lens), len(lens) + seq_len - start)  # each pad its own segment
    same = seg[:, :, None] == seg[:, None, :]
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool).tril()
    return (same & causal)[:, None]


def loss_weights(n_supervised: int, reduction: str) -> float:
    if n_supervised == 0:
        return 0.0
    if reduction == "token":
        return 1.0
    if reduction == "sample":
        return 1.0 / n_supervised
    if reduction == "square":
        return 1.0 / math.sqrt(n_supervised)
    raise ValueError(f"unknown loss_reduction {reduction!r}")


def collate(
    rows: list[list[Sample]],
    pad_id: int = 0,
    loss_reduction: str = "token",
    mask_2d_if_unpacked: bool = True,
    block_mask: bool = True,
) -> dict[str, Any]:
    """Tensors for one micro-batch.

    Returns a dict with
        input_ids long [B, S]; position_ids long [B, S] (restart per sample);
        targets long [B, S] (the next token to predict at each position, -100 = no loss; already shifted,
            so a sample never predicts the first token of the next one);
        loss_weight float [B, S]; attention_mask: bool [B, 1, S, S] (packed) or long [B, S] (padding
            mask, when every row holds one sample and ``mask_2d_if_unpacked``); None instead of the
            [B, 1, S, S] mask when ``block_mask`` is False (the model then attends by ``cu_seqlens``);
        pixel_values float [N_tiles, 3, H, W] or None (all tiles of all rows, row-major);
        segments: per row, the (start, length) of each sample and of the trailing padding;
        cu_seqlens int32 [n_segments + 1] over the flattened batch, padding runs as their own segments
            (for variable-length attention: the model's ``cu_seqlens``), max_seqlen (longest segment);
        num_samples, num_tokens (non-pad) and num_supervised.
    """
    B = len(rows)
    lengths = [[s.num_tokens for s in row] for row in rows]
    S = max(sum(lens) for lens in lengths)
    input_ids = torch.full((B, S), pad_id, dtype=torch.long)
    targets = torch.full((B, S), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((B, S), dtype=torch.long)
    weight = torch.zeros((B, S), dtype=torch.float32)
    pixel_values = []
    cu = [0]
    n_sup = 0
    for b, row in enumerate(rows):
        start = 0
        for s in row:
            n = s.num_tokens
            input_ids[b, start : start + n] = s.input_ids
            targets[b, start : start + n - 1] = s.labels[1:]
            position_ids[b, start : start + n] = torch.arange(n)
            sup = targets[b, start : start + n] != IGNORE_INDEX
            k = int(sup.sum())
            n_sup += k
            weight[b, start : start + n][sup] = loss_weights(k, loss_reduction)
            if s.pixel_values is not None:
                pixel_values.append(s.pixel_values)
            start += n
            cu.append(cu[-1] + n)
        if start < S:  # padding: own positions, no loss, attends only to itself
            position_ids[b, start:] = torch.arange(S - start)
            cu.append(cu[-1] + S - start)
    packed = any(len(row) > 1 for row in rows)
    if packed or not mask_2d_if_unpacked:
        attention_mask = block_causal_mask(lengths, S) if block_mask else None
    else:
        attention_mask = torch.zeros((B, S), dtype=torch.long)
        for b, lens in enumerate(lengths):
            attention_mask[b, : sum(lens)] = 1
    segments = []
    for lens in lengths:
        starts, pos = [], 0
        for n in lens + ([S - sum(lens)] if sum(lens) < S else []):
            starts.append((pos, n))
            pos += n
        segments.append(starts)
    return {
        "segments": segments,
        "input_ids": input_ids,
        "position_ids": position_ids,
        "targets": targets,
        "loss_weight": weight,
        "attention_mask": attention_mask,
        "pixel_values": torch.cat(pixel_values, dim=0) if pixel_values else None,
        "cu_seqlens": torch.tensor(cu, dtype=torch.int32),
        "max_seqlen": max(b - a for a, b in zip(cu[:-1], cu[1:])),
        "num_samples": sum(len(r) for r in rows),
        "num_tokens": sum(sum(lens) for lens in lengths),
        "num_supervised": n_sup,
        # flat positions with a loss, found here on the host: the step selects them without a sync
        "supervised": (targets.reshape(-1) != IGNORE_INDEX).nonzero().squeeze(1),
    }


def weighted_loss(
    logits: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum(w * CE), sum(w)) over all positions; logits [B, S, V] (upcast to fp32), targets/weight [B, S]."""
    ce = torch.nn.functional.cross_entropy(
        logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
    )
    w = weight.flatten().to(ce.dtype)
    return (ce * w).sum(), w.sum()
