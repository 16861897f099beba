"""Ragged batches (``Generator.generate_rows``) and ``ChatModel.batch_chat`` with per-question budgets."""

from __future__ import annotations

import pytest
import torch

import interleaf
from interleaf.errors import InputError


@pytest.fixture(scope="module")
def chat(tiny_ckpt):
    return interleaf.load(tiny_ckpt)


@pytest.fixture(scope="module")
def questions(noise_image):
    qs = ["Compare the two pictures.", "Say something long about nothing.", "What is it?", "Which one?"]
    images = [
        [noise_image(0, 500, 300), noise_image(1, 200, 300)],
        None,
        noise_image(2, 300, 300),
        [noise_image(3, 900, 300)],
    ]
    return qs, images, [4, None, 1, 3]


def test_rows_match_each_prompt_alone_and_the_padded_batch(chat, questions):
    qs, images, budgets = questions
    prepared = chat.prepare_batch(qs, images, budgets)
    assert len({len(ids) for ids, _ in prepared}) == len(qs)  # really ragged
    gen = chat.generator
    cfg = chat._config({"max_new_tokens": 9})
    alone = [gen.generate(torch.tensor([ids]), pixel_values=px, config=cfg) for ids, px in prepared]
    rows = gen.generate_rows([ids for ids, _ in prepared], [px for _, px in prepared], cfg)
    assert rows.tokens == [a.tokens[0] for a in alone]
    assert rows.finish_reasons == [a.finish_reasons[0] for a in alone]
    # forced stops end rows independently
    first = [a.tokens[0][0] for a in alone]
    stop = gen.generate_rows([ids for ids, _ in prepared], [px for _, px in prepared], cfg,
                             stop_token_ids=(first[0],))  # fmt: skip
    assert stop.finish_reasons[0] == "stop" and stop.tokens[0] == []
    for k in range(1, len(qs)):
        expect = alone[k].tokens[0]
        if first[0] in expect:
            assert stop.tokens[k] == expect[: expect.index(first[0])]
        else:
            assert stop.tokens[k] == expect
    padded = chat.generate_batch(prepared, prefill="padded", max_new_tokens=9)
    assert chat.generate_batch(prepared, prefill="rows", max_new_tokens=9) == padded
    assert padded == [chat.decode_reply(a.tokens[0]) for a in alone]


def test_vision_runs_once_per_tile(chat, questions, monkeypatch):
    qs, images, budgets = questions
    prepared = chat.prepare_batch(qs, images, budgets)
    calls = []
    real = chat.model.extract_feature
    monkeypatch.setattr(chat.model, "extract_feature", lambda px: calls.append(px.shape[0]) or real(px))
    chat.generate_batch(prepared, prefill="rows", max_new_tokens=2)
    # CPU: row by row (an accelerator gets one pass over the whole batch)
    assert calls == [px.shape[0] for _, px in prepared if px is not None]
    rows = chat.generate_batch(prepared, prefill="rows", max_new_tokens=4)
    calls.clear()
    monkeypatch.setattr(chat.generator, "batch_vision", True)
    assert chat.generate_batch(prepared, prefill="rows", max_new_tokens=4) == rows
    assert calls == [sum(px.shape[0] for _, px in prepared if px is not None)]


def test_batch_chat_per_question_budgets(chat, questions):
    qs, images, budgets = questions
    batch = chat.batch_chat(qs, images, max_num=budgets, max_new_tokens=6)
    assert batch == [chat.chat(q, im, max_num=m, max_new_tokens=6) for q, im, m in zip(qs, images, budgets)]
    tiles = [px.shape[0] for _, px in chat.prepare_batch(qs[:1], images[:1], [4])]
    assert tiles != [px.shape[0] for _, px in chat.prepare_batch(qs[:1], images[:1], 1)]


def test_bad_batch_input(chat, questions):
    qs, images, _ = questions
    with pytest.raises(InputError, match="max_num entries"):
        chat.batch_chat(qs, images, max_num=[1, 2])
    with pytest.raises(InputError, match="prefill"):
        chat.batch_chat(qs[1:2], prefill="sideways")
    with pytest.raises(InputError, match="empty prompt"):
        chat.generator.generate_rows([[1, 2], []], max_new_tokens=2)
    out = chat.generator.generate_rows([[1, 2], [3]], max_new_tokens=0)
    assert out.tokens == [[], []] and out.finish_reasons == ["length", "length"]
    assert chat.batch_chat([]) == []


def test_eval_adapter_prefetch_and_bad_sample(chat, tiny_ckpt, tmp_path, noise_image):
    from interleaf.eval.adapters import InterleafAdapter, Request

    paths = []
    for k, (w, h) in enumerate([(500, 300), (200, 300), (300, 300), (640, 200)]):
        paths.append(str(tmp_path / f"{k}.png"))
        noise_image(k, w, h).save(paths[-1])
    reqs = [
        Request("<image>\nWhat is it?", paths[:1], max_new_tokens=5, max_num=4),
        Request("Image-1: <image>\nImage-2: <image>\nSame?", paths[1:3], max_new_tokens=5, max_num=2),
        Request("<image>\nBroken?", [str(tmp_path / "missing.png")], max_new_tokens=5),
        Request("<image>\nColour?", paths[3:], max_new_tokens=5, max_num=6),
        Request("No image.", [], max_new_tokens=5),
    ]
    adapter = InterleafAdapter(str(tiny_ckpt), chat_model=chat)
    adapter.prefetch = True
    got = dict(adapter.generate(reqs, batch_size=2))
    assert isinstance(got[2], Exception) and "missing.png" in str(got[2])
    loop = {i: adapter._one(r) for i, r in enumerate(reqs) if i != 2}
    assert {i: got[i] for i in loop} == loop
    assert any("one by one" in note for note in adapter.notes)
    adapter.prefetch = False
    assert {i: v for i, v in adapter.generate(reqs, batch_size=2) if i != 2} == loop


def test_eval_adapter_prefetches_only_with_a_free_core(chat, tiny_ckpt, monkeypatch):
    import os

    from interleaf.eval.adapters import InterleafAdapter

    adapter = InterleafAdapter(str(tiny_ckpt), chat_model=chat)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert adapter._use_prefetch() is False  # torch's threads take every core (CPU model)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert adapter._use_prefetch() is True
    adapter.prefetch = False
    assert adapter._use_prefetch() is False  # an explicit choice wins


def test_parallel_preparation_matches_serial(chat, questions, monkeypatch, tmp_path):
    """prepare_batch tiles in worker threads where cores allow: same ids and pixels, in order, and a
    bad image still fails the call with its one-line error."""
    qs, images, budgets = questions
    monkeypatch.setattr(chat, "prep_workers", 1)
    serial = chat.prepare_batch(qs, images, budgets)
    monkeypatch.setattr(chat, "prep_workers", 4)
    monkeypatch.setattr(chat, "_prep_pool", None)
    parallel = chat.prepare_batch(qs, images, budgets)
    assert chat._prep_pool is not None
    assert [ids for ids, _ in parallel] == [ids for ids, _ in serial]
    for (_, a), (_, b) in zip(parallel, serial):
        assert (a is None and b is None) or torch.equal(a, b)
    with pytest.raises(InputError, match="nope.png"):
        chat.prepare_batch(qs[:2], [images[0], str(tmp_path / "nope.png")], 2)


def _join_and_leave(generator, prepared, cfg, rows: int = 3) -> tuple[dict[int, list[int]], dict[int, int]]:
    """Run ``prepared`` through one RowBatch: two join at once at the start, the others a few steps later
    (after a row has left), request 0 leaves after 2 tokens (its row is taken again), the others after
    ``cfg.max_new_tokens``. Returns each request's tokens and the rows' last owners."""
    n = cfg.max_new_tokens
    lens = [len(ids) for ids, _ in prepared]
    batch = generator.row_batch(rows=rows, start=max(lens[:2]), slots=max(lens) + 40, config=cfg)
    got: dict[int, list[int]] = {}
    owner: dict[int, int] = {}
    waiting = list(range(len(prepared)))
    step = 0
    while waiting or batch.active:
        while waiting and (step == 0 or step >= 3) and batch.can_admit(lens[waiting[0]], n):
            k = waiting.pop(0)
            owner[batch.admit(*prepared[k])] = k
            got[k] = []
            if step == 0 and len(batch.active) == 2:
                break
        for r, tok in batch.sample().items():
            k = owner[r]
            if len(got[k]) == (2 if k == 0 else n):
                batch.release(r)
                continue
            got[k].append(tok)
            if len(got[k]) == n:
                batch.release(r)
        batch.advance()
        step += 1
    batch.close()
    return got, owner


def test_row_batch_rows_join_and_leave_and_get_what_they_get_alone(chat, questions):
    qs, images, budgets = questions
    prepared = chat.prepare_batch(qs, images, budgets)
    cfg = chat._config({"max_new_tokens": 7})
    alone = [chat.generator.generate(torch.tensor([ids]), pixel_values=px, config=cfg).tokens[0]
             for ids, px in prepared]  # fmt: skip
    got, owner = _join_and_leave(chat.generator, prepared, cfg)
    assert got == {k: alone[k][: 2 if k == 0 else 7] for k in range(len(prepared))}
    assert len(set(owner)) < len(prepared)  # rows were reused


def test_row_batch_on_the_cuda_graph_layout_shares_the_step_with_generate(chat):
    """The CUDA path minus the capture (on CPU the graphed step runs eagerly on its static buffers): the
    static full-attention cache and the graphed decode step over all rows, its mask set on admit, both
    shared with ``Generator.generate`` through ``_caches``/``_graphs``. A step first made by generate (its
    buffers inference tensors) made RowBatch.admit fail: "Inplace update to inference tensor outside
    InferenceMode"."""
    from interleaf.generation.engine import Generator

    graphed = Generator(chat.model, static_cache=True)
    graphed.cuda_graphs = True
    qs = ["Say something long about nothing.", "What is it?", "Which one of the two, and why?", "Hm?"]
    prepared = [(chat.prepare(q)[1], None) for q in qs]
    cfg = chat._config({"max_new_tokens": 6})
    alone = [chat.generator.generate(torch.tensor([ids]), config=cfg).tokens[0] for ids, _ in prepared]
    want = {k: alone[k][: 2 if k == 0 else 6] for k in range(len(qs))}
    # generate first: its graphed step for (3 rows, one 256-slot bucket) is the one the RowBatch gets
    ids = [prepared[k][0] for k in range(3)]
    width = max(map(len, ids))
    padded = torch.tensor([[chat.pad_token_id] * (width - len(r)) + r for r in ids])
    mask = (padded != chat.pad_token_id).long()
    batched = graphed.generate(padded, mask, config=cfg).tokens
    assert batched == chat.generator.generate(padded, mask, config=cfg).tokens
    key = (3, graphed._cache_len(max(len(r) for r, _ in prepared) + 40))
    assert list(graphed._graphs) == [key]
    step = graphed._graphs[key]
    got, owner = _join_and_leave(graphed, prepared, cfg)
    assert got == want and len(set(owner)) < len(qs)
    assert graphed._graphs[key] is step and graphed._caches[key].full_attention and not graphed._busy
    # and back to generate: the step's mask is generate's again
    assert graphed.generate(padded, mask, config=cfg).tokens == batched
    # a RowBatch that makes the step itself
    fresh = Generator(chat.model, static_cache=True)
    fresh.cuda_graphs = True
    assert _join_and_leave(fresh, prepared, cfg)[0] == want and list(fresh._graphs) == [key]
    assert fresh.generate(padded, mask, config=cfg).tokens == batched


def test_row_batch_idle_rows_do_not_move_the_rope_scaling_of_the_others():
    """Longrope (Phi-3) picks its frequencies by the batch's largest position (dynamic NTK likewise).
    A released row kept its position, and it grew with every step, so the rows still generating were
    rotated with the long factors, which they never reach alone."""
    from interleaf.generation.engine import Generator
    from interleaf.model import build_model, preset_config

    cfg = preset_config("tiny-phi3", vocab_size=512)
    half = cfg.llm.head_dim // 2
    cfg.llm.original_max_position_embeddings = 32
    cfg.llm.rope_scaling = {
        "rope_type": "longrope",
        "short_factor": [1.0] * half,
        "long_factor": [4.0] * half,
    }
    model = build_model(cfg, seed=0).eval()
    gen = Generator(model)
    long_prompt, short_prompt = list(range(100, 136)), [200, 201, 305, 399, 17, 23]
    batch = gen.row_batch(rows=2, start=36, slots=80, do_sample=False)
    leaver, stayer = batch.admit(long_prompt), batch.admit(short_prompt)
    tokens, logits = [], []
    while len(tokens) < 12:  # the short prompt's positions stay below 32
        logits.append(batch.logits[stayer].clone())
        tokens.append(batch.sample()[stayer])
        batch.release(leaver)  # past 32, but gone before the first decode step
        batch.advance()
    batch.close()
    with torch.inference_mode():  # the short prompt and its reply alone, in one pass
        ref = model(input_ids=torch.tensor([short_prompt + tokens[:-1]])).logits[0, len(short_prompt) - 1 :]
    torch.testing.assert_close(torch.stack(logits), ref, atol=1e-4, rtol=0)


def test_row_batch_a_longer_prompt_moves_the_write_slot_and_all_answer_as_alone(chat, questions):
    """A batch started by a short text prompt takes a longer image prompt at once: the write slot skips
    to its length, the skipped slots a masked gap for the running row (whose positions do not move)."""
    qs, images, budgets = questions
    prepared = chat.prepare_batch(qs, images, budgets)
    text, image = prepared[1], prepared[0]  # no image / two images: the longer prompt
    assert len(image[0]) > len(text[0]) + 2
    cfg = chat._config({"max_new_tokens": 6})
    alone = [chat.generator.generate(torch.tensor([ids]), pixel_values=px, config=cfg).tokens[0]
             for ids, px in (text, image, text)]  # fmt: skip
    batch = chat.generator.row_batch(rows=3, start=len(text[0]), slots=len(image[0]) + 30, config=cfg)
    got: dict[int, list[int]] = {batch.admit(*text, max_new_tokens=6): []}
    owners = [next(iter(got))]
    for step in range(12):
        if step == 2:
            assert not batch.can_admit(len(image[0]), 40)  # its reply would not fit: it waits
            assert batch.can_admit(len(image[0]), 6)
            owners.append(batch.admit(*image, max_new_tokens=6))
            assert batch.t == len(image[0])
            got[owners[-1]] = []
        if step == 4:  # a short prompt joins after the skip
            owners.append(batch.admit(*text, max_new_tokens=6))
            got[owners[-1]] = []
        for r, tok in batch.sample().items():
            got[r].append(tok)
            if len(got[r]) == 6:
                batch.release(r)
        batch.advance()
    batch.close()
    assert [got[r] for r in owners] == alone


def test_row_batch_a_failed_longer_prompt_leaves_the_graphed_step_as_it_was(chat, questions):
    """A longer prompt whose prefill fails (here: too few tiles for its image tokens) must leave the batch
    as it was. It moved the write slot and zeroed the gap in the batch's mask before its prefill, and the
    graphed decode step's copy of the mask was only set after it: the running row went on attending to
    the gap's stale keys (a previous batch's) and its reply changed."""
    from interleaf.generation.engine import Generator

    qs, images, budgets = questions
    image, text = chat.prepare_batch(qs[:2], images[:2], budgets[:2])
    cfg = chat._config({"max_new_tokens": 6})
    want = chat.generator.generate(torch.tensor([text[0]]), config=cfg).tokens[0]
    graphed = Generator(chat.model, static_cache=True)
    graphed.cuda_graphs = True
    slots = len(image[0]) + 20
    batch = graphed.row_batch(rows=2, start=len(image[0]), slots=slots, config=cfg)
    batch.admit(*image, max_new_tokens=2)  # leaves its keys in the slots the gap will cover
    batch.sample()
    batch.advance()
    batch.close()
    batch = graphed.row_batch(rows=2, start=len(text[0]), slots=slots, config=cfg)
    batch.admit(*text, max_new_tokens=6)
    got: list[int] = []
    for step in range(6):
        if step == 2:
            t = batch.t
            with pytest.raises(InputError, match="image"):
                batch.admit(image[0], image[1][:1], max_new_tokens=2)
            assert batch.t == t and len(batch.active) == 1
        got += batch.sample().values()
        batch.advance()
    batch.close()
    assert got == want
