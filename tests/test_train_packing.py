"""Packing: a packed sequence computes exactly what its samples compute alone; loss reductions."""

from __future__ import annotations

import math

import pytest
import torch

from interleaf.train.data import IGNORE_INDEX, Sample
from interleaf.train.packing import Batcher, SampleStream, block_causal_mask, collate
from interleaf.train.trainer import TrainStep

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from interleaf.model.checkpoint import load_checkpoint
    from interleaf.train.demo import init_demo_model

    d = tmp_path_factory.mktemp("tiny")
    init_demo_model(d, image_size=56, vit=(32, 1), llm=(64, 2))
    model, tok = load_checkpoint(d)
    return model.float().eval(), tok


def make_sample(gen, model, n_text, n_tiles, n_sup):
    """Random text tokens, ``n_tiles`` images of context tokens after the first 3, last ``n_sup`` trained."""
    cfg = model.config
    ctx, vocab = cfg.img_context_token_id, 200
    head = torch.randint(1, vocab, (3,), generator=gen)
    img = torch.full((n_tiles * cfg.num_image_token,), ctx)
    tail = torch.randint(1, vocab, (n_text,), generator=gen)
    ids = torch.cat([head, img, tail])
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[-n_sup:] = ids[-n_sup:]
    pv = torch.randn(n_tiles, 3, cfg.image_size, cfg.image_size, generator=gen) if n_tiles else None
    return Sample(ids, labels, pv, [1] * n_tiles)


@pytest.fixture(scope="module")
def samples(tiny):
    model, _ = tiny
    gen = torch.Generator().manual_seed(0)
    return [
        make_sample(gen, model, 9, 1, 4),
        make_sample(gen, model, 5, 0, 2),
        make_sample(gen, model, 12, 2, 7),
    ]


def test_block_causal_mask():
    m = block_causal_mask([[2, 3], [4]], 5)
    assert m.shape == (2, 1, 5, 5)
    assert m[0, 0, 1].tolist() == [True, True, False, False, False]
    assert m[0, 0, 4].tolist() == [False, False, True, True, True]
    assert m[1, 0, 4].tolist() == [False, False, False, False, True]  # padding sees only itself


def test_packed_logits_equal_separate(tiny, samples):
    model, _ = tiny
    packed = collate([samples], pad_id=0)
    assert packed["attention_mask"].shape[-1] == sum(s.num_tokens for s in samples)
    assert packed["position_ids"][0, samples[0].num_tokens].item() == 0  # restarts per sample
    flat_targets = packed["targets"].reshape(-1)
    assert packed["supervised"].tolist() == [i for i, t in enumerate(flat_targets.tolist()) if t != -100]
    assert len(packed["supervised"]) == packed["num_supervised"]
    with torch.no_grad():
        out = model(
            input_ids=packed["input_ids"],
            pixel_values=packed["pixel_values"],
            attention_mask=packed["attention_mask"],
            position_ids=packed["position_ids"],
        ).logits[0]
        start = 0
        for s in samples:
            alone = model(input_ids=s.input_ids[None], pixel_values=s.pixel_values).logits[0]
            torch.testing.assert_close(out[start : start + s.num_tokens], alone, atol=1e-5, rtol=1e-5)
            start += s.num_tokens
        # variable-length attention (cu_seqlens, no mask built) computes the same as the block mask
        lean = collate([samples], pad_id=0, block_mask=False)
        assert lean["attention_mask"] is None
        assert lean["max_seqlen"] == max(s.num_tokens for s in samples)
        varlen = model(
            input_ids=lean["input_ids"],
            pixel_values=lean["pixel_values"],
            position_ids=lean["position_ids"],
            cu_seqlens=lean["cu_seqlens"],
        ).logits[0]
        torch.testing.assert_close(varlen, out, atol=1e-5, rtol=1e-5)
        # position ids default to restarting at every segment
        default_pos = model(
            input_ids=lean["input_ids"], pixel_values=lean["pixel_values"], cu_seqlens=lean["cu_seqlens"]
        ).logits[0]
        torch.testing.assert_close(default_pos, varlen, atol=0, rtol=0)


def test_varlen_two_padded_rows_equal_mask(tiny, samples):
    """Two packed rows of different lengths (padding as its own segment): cu_seqlens == block mask."""
    model, _ = tiny
    rows = [[samples[0], samples[1]], [samples[2]]]
    masked = collate(rows, pad_id=0)
    lean = collate(rows, pad_id=0, block_mask=False)
    with torch.no_grad():
        a = model(
            input_ids=masked["input_ids"],
            pixel_values=masked["pixel_values"],
            attention_mask=masked["attention_mask"],
            position_ids=masked["position_ids"],
        ).logits
        b = model(
            input_ids=lean["input_ids"],
            pixel_values=lean["pixel_values"],
            position_ids=lean["position_ids"],
            cu_seqlens=lean["cu_seqlens"],
            max_seqlen=lean["max_seqlen"],
        ).logits
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    step = TrainStep(model)
    with torch.no_grad():
        la, wa = step(masked)
        lb, wb = step(lean)
    assert float(lb / wb) == pytest.approx(float(la / wa), rel=1e-6)


@pytest.mark.parametrize("mono", [False, True])
def test_qwen3_packed_rows_compute_what_each_sample_computes_alone(mono):
    """InternVL3.5's LLM family (tiny-qwen3: per-head q/k RMSNorm, head_dim 64 != 128 / 4 heads), and a
    Mono-InternVL on it with visual attention experts: the block mask and variable-length attention give
    each packed sample its own logits."""
    from interleaf.model.mono_checkpoint import build_mono_model
    from interleaf.model.mono_internvl import MonoInternVLConfig
    from interleaf.model.presets import build_model, preset_config

    cfg = preset_config("tiny-qwen3", vocab_size=512)
    cfg.img_context_token_id = 500
    if mono:
        model = build_mono_model(MonoInternVLConfig.from_internvl(cfg, True), seed=1, copy_experts=False)
    else:
        model = build_model(cfg, seed=1)
    model.eval()
    gen = torch.Generator().manual_seed(0)
    samples = [
        make_sample(gen, model, 9, 1, 4),
        make_sample(gen, model, 5, 0, 2),
        make_sample(gen, model, 12, 1, 7),
    ]
    rows = [samples[:2], samples[2:]]
    masked, lean = collate(rows, pad_id=0), collate(rows, pad_id=0, block_mask=False)
    with torch.no_grad():
        a = model(input_ids=masked["input_ids"], pixel_values=masked["pixel_values"],
                  attention_mask=masked["attention_mask"], position_ids=masked["position_ids"]).logits  # fmt: skip
        b = model(input_ids=lean["input_ids"], pixel_values=lean["pixel_values"], position_ids=lean["position_ids"],
                  cu_seqlens=lean["cu_seqlens"], max_seqlen=lean["max_seqlen"]).logits  # fmt: skip
        for r, row in enumerate(rows):
            start = 0
            for s in row:
                alone = model(input_ids=s.input_ids[None], pixel_values=s.pixel_values).logits[0]
                for packed in (a, b):
                    torch.testing.assert_close(
                        packed[r, start : start + s.num_tokens], alone, atol=1e-5, rtol=1e-5
                    )
                start += s.num_tokens


@pytest.mark.parametrize("reduction", ["token", "sample", "square"])
def test_packed_loss_is_weighted_sum_of_separate_losses(tiny, samples, reduction):
    model, _ = tiny
    step = TrainStep(model)
    with torch.no_grad():
        loss_sum, w_sum = step(collate([samples], 0, reduction))
        per_sample = []  # (sum of CE, supervised tokens), computed alone with plain cross-entropy
        for s in samples:
            logits = model(input_ids=s.input_ids[None], pixel_values=s.pixel_values).logits[0]
            ce = torch.nn.functional.cross_entropy(logits[:-1], s.labels[1:], reduction="sum")
            per_sample.append((float(ce), int((s.labels[1:] != IGNORE_INDEX).sum())))
    w = {"token": lambda n: 1.0, "sample": lambda n: 1.0 / n, "square": lambda n: 1.0 / math.sqrt(n)}[
        reduction
    ]
    expected = sum(w(n) * ce for ce, n in per_sample) / sum(w(n) * n for _, n in per_sample)
    assert float(loss_sum / w_sum) == pytest.approx(expected, rel=1e-5)


def test_padded_batch_equals_packed_loss(tiny, samples):
    """Unpacked rows (2-D padding mask) and one packed row give the same token-mean loss."""
    model, _ = tiny
    step = TrainStep(model)
    with torch.no_grad():
        a = step(collate([samples], 0))
        b = step(collate([[s] for s in samples], 0))
    assert float(a[0] / a[1]) == pytest.approx(float(b[0] / b[1]), rel=1e-5)


class ListData:
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def get(self, i, epoch=0):
        return self.items[i]


def test_batcher_budgets_and_resume(tiny):
    model, _ = tiny
    gen = torch.Generator().manual_seed(1)
    items = [
        make_sample(gen, model, int(torch.randint(5, 40, (1,), generator=gen)), i % 3, 2) for i in range(30)
    ]
    items[7] = None  # a skipped sample
    b = Batcher(
        SampleStream(ListData(items), seed=3), batch_size=2, packing=True, max_tokens=64, max_images=3
    )
    seen = []
    for _ in range(5):
        for row in b.next_batch():
            assert sum(s.num_tokens for s in row) <= 64 or len(row) == 1
            assert sum(s.num_images for s in row) <= 3 or len(row) == 1
            seen += [id(s) for s in row]
    assert len(seen) == len(set(seen))  # no sample twice within the epoch
    state = b.state_dict()
    expect = [[id(s) for s in row] for _ in range(4) for row in b.next_batch()]
    b2 = Batcher(
        SampleStream(ListData(items), seed=3), batch_size=2, packing=True, max_tokens=64, max_images=3
    )
    b2.load_state_dict(state)
    got = [[id(s) for s in row] for _ in range(4) for row in b2.next_batch()]
    assert got == expect


class SlowSkippingData:
    """Items that take a random time to build (so read-ahead threads finish out of order); every
    fifth one is bad and lands in the skip log."""

    def __init__(self, n):
        from interleaf.train.data import SkipLog

        self.n = n
        self.skip_log = SkipLog()

    def __len__(self):
        return self.n

    def get(self, i, epoch=0):
        import random
        import time

        from interleaf.train.data import SkipSample

        time.sleep(random.Random(f"{i}-{epoch}").random() * 0.002)
        if i % 5 == 3:
            self.skip_log.add("slow", i, f"id{i}", SkipSample("bad", f"item {i}"))
            return None
        return (epoch, i)


@pytest.mark.parametrize("workers", [1, 3])
def test_read_ahead_workers_yield_the_same_stream(workers):
    """Read-ahead threads change nothing a run can see: the same samples in the same order across
    epochs, skips recorded when consumed (so a checkpoint's counts match), resume mid-epoch."""

    def walk(stream, n):
        out = []
        for _ in range(n):
            out.append(stream.next())
            out.append((dict(stream.skip_log.counts), len(stream.skip_log.records)))
        return out

    plain = SampleStream(SlowSkippingData(23), seed=5)
    ahead = SampleStream(SlowSkippingData(23), seed=5, workers=workers)
    assert walk(ahead, 30) == walk(plain, 30)  # 30 good samples: into the second epoch
    state = ahead.state_dict()
    assert ahead.skip_log.records == plain.skip_log.records
    expect = walk(plain, 25)
    assert walk(ahead, 25) == expect
    resumed = SampleStream(SlowSkippingData(23), seed=5, workers=workers)
    resumed.load_state_dict(state)
    resumed.skip_log.counts.update(plain.skip_log.counts)  # as the trainer restores its counts
    got = walk(resumed, 25)
    assert [x for x in got if len(x) == 3] == [x for x in expect if len(x) == 3]
    ahead.close()
    assert ahead.next() == plain.next()  # a closed stream still works, without threads
