"""The generation engine against transformers' InternVL ``generate`` and against itself."""

from __future__ import annotations

import pytest
import torch

from interleaf.errors import InputError
from interleaf.generation.chat import ChatModel
from interleaf.generation.engine import (
    GenerationConfig,
    Generator,
    optimize_for_cpu,
    restore_cpu_linears,
    sample_next,
    warp_logits,
)


@pytest.fixture(scope="module")
def chat(tiny_ckpt_hf):
    return ChatModel.from_pretrained(tiny_ckpt_hf)


@pytest.fixture(scope="module")
def hf_model(tiny_ckpt_hf):
    import transformers

    return transformers.InternVLForConditionalGeneration.from_pretrained(
        tiny_ckpt_hf, dtype=torch.float32
    ).eval()


def _left_pad(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r)
        mask[i, width - len(r) :] = 1
    return ids, mask


def _hf_new_tokens(seq: torch.Tensor, prompt_len: int, stop_ids, pad: int) -> list[int]:
    out = []
    for t in seq[prompt_len:].tolist():
        if t in stop_ids:
            break
        out.append(t)
    return out


def test_greedy_matches_transformers_generate(chat, hf_model, noise_image):
    _, ids, px, _ = chat.prepare("What is in the image?", images=noise_image(0), max_num=2)
    input_ids = torch.tensor([ids])
    ours = chat.generator.generate(
        input_ids, pixel_values=px, max_new_tokens=24, stop_token_ids=chat.stop_token_ids
    )
    with torch.no_grad():
        ref = hf_model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            pixel_values=px,
            max_new_tokens=24,
            do_sample=False,
            eos_token_id=list(chat.stop_token_ids),
            pad_token_id=chat.pad_token_id,
        )
    assert ours.tokens[0] == _hf_new_tokens(ref[0], len(ids), chat.stop_token_ids, chat.pad_token_id)
    assert len(ours.tokens[0]) > 0


@pytest.fixture(scope="module")
def qwen3_pair(tmp_path_factory):
    """tiny-qwen3 (InternVL3.5's LLM: per-head q/k RMSNorm, head_dim 64 != 128 / 4 heads), -hf layout:
    interleaf's ChatModel and transformers' InternVL on the same weights."""
    import transformers

    from interleaf.model import init_model

    path = init_model("tiny-qwen3", tmp_path_factory.mktemp("ckpt") / "qwen3", layout="hf", seed=0)
    hf = transformers.InternVLForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    return ChatModel.from_pretrained(path), hf


@pytest.mark.parametrize("preset", ["tiny", "tiny-qwen3"])
def test_left_padded_batch_matches_transformers_and_single_rows(preset, request, noise_image):
    chat, hf_model = (
        request.getfixturevalue("qwen3_pair")
        if preset == "tiny-qwen3"
        else (request.getfixturevalue("chat"), request.getfixturevalue("hf_model"))
    )
    # text-only rows of different lengths plus a row with an image
    prompts = [chat.prepare(q)[1] for q in ("hello", "describe the red car on the left of the street")]
    _, img_ids, px, _ = chat.prepare("what colour?", images=noise_image(1, 200, 200), max_num=1)
    rows = [prompts[0], img_ids, prompts[1]]
    ids, mask = _left_pad(rows, chat.pad_token_id)
    kw = dict(max_new_tokens=12, stop_token_ids=chat.stop_token_ids, pad_token_id=chat.pad_token_id)
    batch = chat.generator.generate(ids, mask, pixel_values=px, **kw)
    singles = [
        chat.generator.generate(torch.tensor([r]), pixel_values=px if r is img_ids else None, **kw).tokens[0]
        for r in rows
    ]
    assert batch.tokens == singles
    with torch.no_grad():
        ref = hf_model.generate(
            input_ids=ids,
            attention_mask=mask,
            pixel_values=px,
            max_new_tokens=12,
            do_sample=False,
            eos_token_id=list(chat.stop_token_ids),
            pad_token_id=chat.pad_token_id,
        )
    for i in range(len(rows)):
        assert batch.tokens[i] == _hf_new_tokens(ref[i], ids.shape[1], chat.stop_token_ids, chat.pad_token_id)
    # ChatModel.batch_chat's left-padded prefill (and the CPU default, rows) answers as chat does
    qs, ims = ["hello", "what colour?", "describe the red car"], [None, noise_image(1, 200, 200), None]
    alone = [chat.chat(q, images=im, max_num=1, max_new_tokens=8) for q, im in zip(qs, ims)]
    for prefill in ("padded", "rows"):
        assert chat.batch_chat(qs, ims, max_num=1, prefill=prefill, max_new_tokens=8) == alone


def _stopping_checkpoint(src, dst, question: str):
    """A copy of checkpoint ``src`` whose greedy reply to ``question`` ends with the template's end token:
    its lm_head row is a token's row that the reply takes a few tokens in, scaled up (random weights
    never stop on their own). Returns ``(path, ChatModel)``."""
    import shutil

    from safetensors.torch import load_file, save_file

    chat = ChatModel.from_pretrained(src)
    ids = torch.tensor([chat.prepare(question)[1]])
    free = chat.generator.generate(ids, max_new_tokens=24, ignore_eos=True).tokens[0]
    token = free[next(i for i in range(3, len(free)) if free[i] not in free[:i])]
    end = chat.tokenizer.convert_tokens_to_ids(chat.template.stop_str)
    shutil.copytree(src, dst)
    weights = load_file(f"{dst}/model.safetensors")
    head = next(k for k in weights if k.endswith("lm_head.weight"))
    weights[head][end] = weights[head][token] * 1.01
    save_file(weights, f"{dst}/model.safetensors", metadata={"format": "pt"})
    return dst, ChatModel.from_pretrained(dst)


def test_greedy_stops_on_the_templates_end_token_as_transformers(tiny_ckpt_hf, tmp_path):
    """Greedy against transformers where the reply does end on the template's end token, eos given as a
    list or one id, max_new_tokens from 1 to past the stop; the end token is not part of the reply."""
    import transformers

    path, chat = _stopping_checkpoint(tiny_ckpt_hf, tmp_path / "stops", "hello")
    hf = transformers.InternVLForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.tensor([chat.prepare("hello")[1]])
    end = chat.stop_token_ids[0]
    assert chat.template.stop_str == chat.tokenizer.convert_ids_to_tokens(end)
    with torch.no_grad():
        free = hf.generate(
            input_ids=ids, max_new_tokens=30, do_sample=False, eos_token_id=end, pad_token_id=0
        )
    k = free.shape[1] - ids.shape[1]  # the end token is the k-th new token
    assert free[0, -1] == end and 3 < k < 30
    for stops, eos in [(chat.stop_token_ids, list(chat.stop_token_ids)), ((end,), end)]:
        for n in (1, 2, k - 1, k, k + 1, 30):
            ours = chat.generator.generate(ids, max_new_tokens=n, stop_token_ids=stops)
            with torch.no_grad():
                ref = hf.generate(
                    input_ids=ids, max_new_tokens=n, do_sample=False, eos_token_id=eos, pad_token_id=0
                )
            assert ours.tokens[0] == _hf_new_tokens(ref[0], ids.shape[1], stops, 0), (stops, n)
            assert ours.finish_reasons == ["stop" if n >= k else "length"], n
    reply = chat.chat("hello", max_new_tokens=30)
    assert reply == chat.decode_reply(free[0, ids.shape[1] : -1].tolist()) and reply
    assert "".join(chat.stream_chat("hello", max_new_tokens=30)) == reply


def test_streaming_yields_the_same_tokens(chat):
    _, ids, _, _ = chat.prepare("count to ten")
    input_ids = torch.tensor([ids, ids])
    full = chat.generator.generate(input_ids, max_new_tokens=10)
    steps = list(chat.generator.stream(input_ids, max_new_tokens=10))
    assert torch.stack(steps, dim=1).tolist() == full.tokens
    seen = []
    chat.generator.generate(input_ids, max_new_tokens=10, callback=lambda t: seen.append(t.tolist()))
    assert [list(col) for col in zip(*seen)] == full.tokens


def test_stop_token_ends_each_row_independently(chat):
    _, ids, _, _ = chat.prepare("a question")
    free = chat.generator.generate(torch.tensor([ids]), max_new_tokens=16).tokens[0]
    k = next(i for i in range(2, len(free)) if free[i] not in free[:i])
    stop = free[k]
    out = chat.generator.generate(torch.tensor([ids]), max_new_tokens=16, stop_token_ids=(stop,))
    assert out.tokens[0] == free[:k] and out.finish_reasons == ["stop"]
    # min_new_tokens suppresses the stop token for the first steps: the stream then diverges
    out = chat.generator.generate(
        torch.tensor([ids]), max_new_tokens=16, stop_token_ids=(stop,), min_new_tokens=k + 1
    )
    assert out.tokens[0][:k] == free[:k] and len(out.tokens[0]) > k and out.tokens[0][k] != stop
    # a batch in which only one row stops: the other runs to max_new_tokens
    _, other, _, _ = chat.prepare("something different entirely")
    ids2, mask = _left_pad([ids, other], chat.pad_token_id)
    batch = chat.generator.generate(ids2, mask, max_new_tokens=16, stop_token_ids=(stop,), pad_token_id=0)
    assert batch.tokens[0] == free[:k] and batch.finish_reasons[0] == "stop"
    alone = chat.generator.generate(torch.tensor([other]), max_new_tokens=16, stop_token_ids=(stop,))
    assert batch.tokens[1] == alone.tokens[0]
    no_stop = chat.generator.generate(
        torch.tensor([ids]), max_new_tokens=16, ignore_eos=True, stop_token_ids=(stop,)
    )
    assert no_stop.tokens[0] == free


def test_sampling_is_seeded_and_top_k_1_is_greedy(chat):
    _, ids, _, _ = chat.prepare("tell a story")
    input_ids = torch.tensor([ids])
    greedy = chat.generator.generate(input_ids, max_new_tokens=12).tokens[0]
    kw = dict(max_new_tokens=12, do_sample=True, temperature=5.0)
    a = chat.generator.generate(input_ids, seed=7, **kw).tokens[0]
    b = chat.generator.generate(input_ids, seed=7, **kw).tokens[0]
    c = chat.generator.generate(input_ids, seed=8, **kw).tokens[0]
    assert a == b and a != c and a != greedy
    assert chat.generator.generate(input_ids, seed=3, top_k=1, **kw).tokens[0] == greedy
    assert chat.generator.generate(input_ids, seed=3, top_p=1e-6, **kw).tokens[0] == greedy
    assert (
        chat.generator.generate(input_ids, seed=3, do_sample=True, temperature=0.0).tokens[0][:12] == greedy
    )


def test_logits_warpers_match_transformers():
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    torch.manual_seed(0)
    logits = torch.randn(4, 50) * 3
    for temperature, top_k, top_p in [(0.7, 0, 1.0), (1.0, 5, 1.0), (1.3, 0, 0.8), (0.9, 10, 0.6)]:
        ref = TemperatureLogitsWarper(temperature)(None, logits.clone())
        if top_k:
            ref = TopKLogitsWarper(top_k)(None, ref)
        if top_p < 1:
            ref = TopPLogitsWarper(top_p)(None, ref)
        cfg = GenerationConfig(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p)
        # our samples stay inside the support transformers keeps, with its probabilities
        gen = torch.Generator().manual_seed(0)
        kept = torch.isfinite(ref)
        samples = torch.stack([sample_next(logits, cfg, gen) for _ in range(300)], dim=1)  # [4, 300]
        for row in range(4):
            assert set(samples[row].tolist()) <= set(kept[row].nonzero().flatten().tolist())
        # the probabilities: compare the distributions directly
        probs_ref = ref.softmax(-1)
        freq = torch.stack([torch.bincount(samples[r], minlength=50).float() / 300 for r in range(4)])
        assert (freq - probs_ref).abs().max() < 0.12


def test_warped_logits_are_transformers_processors_exactly():
    """The distribution a sampling step draws from is, bit for bit, what transformers' warpers make of the
    same logits (fp32 and bf16 logits, ties, top_k past the vocabulary, top_p near 0 and near 1)."""
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    g = torch.Generator().manual_seed(0)
    for dtype, scale in [(torch.float32, 3.0), (torch.bfloat16, 10.0), (torch.float32, 30.0)]:
        logits = (torch.randn(4, 300, generator=g) * scale).to(dtype)
        logits[0, :10] = logits[0, 0]  # ties
        for temperature in (1.0, 0.7, 1.3, 1e-3):
            for top_k in (0, 1, 5, 50, 5000):
                for top_p in (1.0, 0.9, 0.5, 1e-6):
                    ref = LogitsProcessorList()
                    if temperature != 1.0:
                        ref.append(TemperatureLogitsWarper(temperature))
                    if top_k:
                        ref.append(TopKLogitsWarper(top_k))
                    if top_p < 1:
                        ref.append(TopPLogitsWarper(top_p))
                    cfg = GenerationConfig(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p)
                    want = ref(None, logits.float())  # generate hands the processors fp32 logits
                    assert torch.equal(warp_logits(logits, cfg), want), (dtype, temperature, top_k, top_p)


def test_seeded_sampling_matches_transformers_generate(chat, hf_model):
    """Seeded sampling draws the very tokens transformers' generate draws after torch.manual_seed (CPU):
    defaults included (generate samples from the top 50 when do_sample=True alone; the engine sampled
    from the whole vocabulary), min_new_tokens, several eos ids and a left-padded batch."""
    rows = [chat.prepare(q)[1] for q in ("tell me a story about the sea", "hi")]
    stops = chat.stop_token_ids
    cases = [
        ([rows[0]], {}),
        ([rows[0]], dict(temperature=0.7, top_k=5)),
        ([rows[0]], dict(temperature=1.3, top_p=0.8, top_k=0, min_new_tokens=4)),
        (rows, dict(temperature=0.9, top_k=20, top_p=0.9)),
    ]
    for prompts, kw in cases:
        ids, mask = _left_pad(prompts, chat.pad_token_id)
        for seed in (0, 1):
            ours = chat.generator.generate(
                ids, mask, max_new_tokens=12, do_sample=True, seed=seed, stop_token_ids=stops,
                pad_token_id=chat.pad_token_id, **kw,
            )  # fmt: skip
            torch.manual_seed(seed)
            with torch.no_grad():
                ref = hf_model.generate(
                    input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=True,
                    eos_token_id=list(stops), pad_token_id=chat.pad_token_id, **kw,
                )  # fmt: skip
            want = [_hf_new_tokens(r, ids.shape[1], stops, chat.pad_token_id) for r in ref]
            assert ours.tokens == want, (kw, seed)


def test_a_vanishing_temperature_samples_its_limit():
    """logits / temperature overflowing (a positive temperature as small as 1e-40) failed the step on an
    inf/nan probability; it samples its limit, the most likely token, as greedy does."""
    logits = torch.tensor([[2.0, 5.0, 1.0, 4.9], [-3.0, -1.0, -2.0, -1.5], [0.5, 0.1, 0.2, 0.3]])
    for temperature in (1e-40, 1e-45, 5e-324):
        cfg = GenerationConfig(do_sample=True, temperature=temperature)
        gen = torch.Generator().manual_seed(0)
        assert sample_next(logits, cfg, gen).tolist() == [1, 1, 0]
        assert sample_next(logits.bfloat16(), cfg, gen).tolist() == [1, 1, 0]
    # where the division does not overflow, nothing changes: transformers' warper, bit for bit
    cfg = GenerationConfig(do_sample=True, temperature=1e-30, top_k=0)
    assert torch.equal(warp_logits(logits, cfg), logits / 1e-30)


def test_generation_config_validation(chat):
    with pytest.raises(InputError, match="top_p"):
        GenerationConfig(top_p=0)
    with pytest.raises(InputError, match="unknown generation option"):
        chat.generator.generate(torch.tensor([[1, 2]]), beams=3)
    with pytest.raises(InputError, match="temperature"):
        chat.chat("hi", temperature=-1)
    assert chat.generator.generate(torch.tensor([[1, 2]]), max_new_tokens=0).tokens == [[]]


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (dict(top_k=2.5), "top_k must be an int"),
        (dict(seed="x"), "seed must be an int"),
        (dict(max_new_tokens=2.5), "max_new_tokens must be an int"),
        (dict(min_new_tokens=-1), "min_new_tokens must be >= 0"),
        (dict(temperature=float("nan")), "temperature must be a number"),
        (dict(top_p=None), "top_p must be a number"),
    ],
)
def test_generation_options_of_a_wrong_type_are_input_errors_naming_them(chat, kwargs, needle):
    """They failed deep in torch (topk, manual_seed, the cache's shape; a NaN temperature at the first
    draw) with a TypeError or RuntimeError naming none of them."""
    with pytest.raises(InputError, match=needle):
        chat.chat("hi", do_sample=True, max_new_tokens=kwargs.pop("max_new_tokens", 2), **kwargs)
    import numpy as np

    assert GenerationConfig(top_k=np.int64(5), seed=np.int64(1), temperature=1).top_k == 5


def test_cpu_packed_linears_keep_results(tiny_ckpt):
    from interleaf.model import load_checkpoint

    model, _ = load_checkpoint(tiny_ckpt, dtype="bfloat16")
    ids = torch.randint(0, 200, (2, 9))
    with torch.inference_mode():
        ref = model(input_ids=ids).logits.float()
    n = optimize_for_cpu(model)
    if n == 0:
        pytest.skip("oneDNN prepacking unavailable")
    with torch.inference_mode():
        packed = model(input_ids=ids).logits.float()
    torch.testing.assert_close(packed, ref, atol=3e-2, rtol=3e-2)
    gen = Generator(model)
    out = gen.generate(ids[:1], max_new_tokens=5)
    assert len(out.tokens[0]) == 5
    # the parameters are untouched; restoring gives the plain path back
    assert all(not p.is_mkldnn for p in model.parameters())
    restore_cpu_linears(model)
    with torch.inference_mode():
        torch.testing.assert_close(model(input_ids=ids).logits.float(), ref)


def test_static_full_length_cache_matches_and_is_reused(chat):
    """The CUDA-graph layout (reused full-length cache, masked attention over the whole buffer) on CPU."""
    static = Generator(chat.model, static_cache=True)
    rows = [chat.prepare(q)[1] for q in ("a long question about the picture and its colours", "short")]
    ids, mask = _left_pad(rows, chat.pad_token_id)
    kw = dict(max_new_tokens=10, stop_token_ids=chat.stop_token_ids, pad_token_id=chat.pad_token_id)
    expected = chat.generator.generate(ids, mask, **kw).tokens
    assert static.generate(ids, mask, **kw).tokens == expected
    # a second, shorter call reuses the same buffers (stale slots must stay invisible)
    single = chat.generator.generate(torch.tensor([rows[1]]), **kw).tokens
    assert static.generate(torch.tensor([rows[1]]), **kw).tokens == single
    assert static.generate(ids, mask, **kw).tokens == expected
    assert len(static._caches) == 2 and all(c.full_attention for c in static._caches.values())


def test_static_cache_prefill_takes_the_causal_kernel(chat, monkeypatch):
    """With the CUDA-graph cache layout an unpadded prefill still attends only the prompt's slots with
    ``is_causal`` (a fused kernel on a GPU); only the decode steps attend the whole buffer under a mask."""
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, is_causal=False, **kw):
        calls.append((q.shape[-2], k.shape[-2], attn_mask is None, is_causal))
        return sdpa(q, k, v, attn_mask=attn_mask, is_causal=is_causal, **kw)

    static = Generator(chat.model, static_cache=True)
    ids = torch.tensor([chat.prepare("a question about colours")[1]])
    kw = dict(max_new_tokens=3, ignore_eos=True)
    expected = chat.generator.generate(ids, **kw).tokens
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    assert static.generate(ids, **kw).tokens == expected
    s, layers = ids.shape[1], chat.model.config.llm.num_hidden_layers
    max_len = static._cache_len(s + 3)
    assert max_len > s
    assert calls[:layers] == [(s, s, True, True)] * layers  # prefill: causal kernel, prompt slots only
    assert calls[layers:] and all(c[1] == max_len and not c[2] for c in calls[layers:])  # decode: masked


def test_packed_linear_follows_weight_changes():
    lin = torch.nn.Linear(16, 8).to(torch.bfloat16)
    if optimize_for_cpu(lin) == 0:
        pytest.skip("oneDNN prepacking unavailable")
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    with torch.inference_mode():
        before = lin(x)
    with torch.no_grad():
        lin.weight.mul_(2)  # in-place change after packing: must be seen
    with torch.inference_mode():
        after = lin(x)
    torch.testing.assert_close(after.float(), torch.nn.functional.linear(x, lin.weight, lin.bias).float())
    assert not torch.allclose(before, after)
    lin.weight = torch.nn.Parameter(torch.zeros(8, 16, dtype=torch.bfloat16))  # replaced
    with torch.inference_mode():
        torch.testing.assert_close(lin(x), lin.bias.expand(3, 8))
    # with gradients the plain path runs and gradients flow
    lin(x.float().to(torch.bfloat16).requires_grad_()).sum().backward()
    assert lin.weight.grad is not None


def test_large_fp32_linears_are_prepacked_small_ones_left_alone():
    """fp32 layers from PACK_MIN_NUMEL elements run on a oneDNN-prepacked copy (same results to float
    rounding, weight changes followed); smaller fp32 layers keep the plain kernel (no wrapper)."""
    from interleaf.generation.engine import PACK_MIN_NUMEL

    model = torch.nn.Sequential(torch.nn.Linear(1024, PACK_MIN_NUMEL // 1024), torch.nn.Linear(512, 16))
    x = torch.randn(3, 1024)
    with torch.inference_mode():
        ref = model(x)
    if not torch.backends.mkldnn.is_available():
        pytest.skip("oneDNN prepacking unavailable")
    assert optimize_for_cpu(model) == 1
    assert "forward" in vars(model[0]) and "forward" not in vars(model[1])
    with torch.inference_mode():
        torch.testing.assert_close(model(x), ref, atol=1e-4, rtol=1e-4)
        model[0].weight.mul_(-1)  # changed in place after packing: must be seen
        torch.testing.assert_close(model[0](x), torch.nn.functional.linear(x, model[0].weight, model[0].bias))
    restore_cpu_linears(model)
    assert "forward" not in vars(model[0])


def test_interleaved_streams_do_not_share_a_static_cache(chat):
    static = Generator(chat.model, static_cache=True)
    a_ids = torch.tensor([chat.prepare("first question")[1]])
    b_ids = torch.tensor([chat.prepare("second, different question")[1]])
    expected = [chat.generator.generate(x, max_new_tokens=8).tokens[0] for x in (a_ids, b_ids)]
    sa, sb = static.stream(a_ids, max_new_tokens=8), static.stream(b_ids, max_new_tokens=8)
    got_a, got_b = [], []
    for ta, tb in zip(sa, sb):  # alternate steps of the two generations
        got_a.append(int(ta[0]))
        got_b.append(int(tb[0]))
    assert [got_a, got_b] == expected
    assert not static._busy


def test_streams_leave_the_callers_grad_mode_alone(chat):
    """Interleaved streams that finish out of order, or one abandoned half-way, must not leave the
    thread in inference mode (later training in the same process would silently get no gradients)."""
    ids = torch.tensor([chat.prepare("a question")[1]])
    sa, sb = chat.generator.stream(ids, max_new_tokens=6), chat.generator.stream(ids, max_new_tokens=3)
    next(sa)
    assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
    next(sb)
    for _ in sa:
        assert torch.is_grad_enabled()
    for _ in sb:
        pass
    abandoned = chat.generator.stream(ids, max_new_tokens=6)
    next(abandoned)
    del abandoned
    assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
    assert torch.ones(1, requires_grad=True).mul(2).requires_grad


def test_graph_step_buffers_on_cpu(chat):
    """The CUDA-graph decode path minus the capture: static input buffers, one reused step per shape."""
    graphed = Generator(chat.model, static_cache=True)
    graphed.cuda_graphs = True  # on CPU the "graph" runs eagerly on its static buffers
    rows = [chat.prepare(q)[1] for q in ("what is shown here, in detail?", "hi")]
    ids, mask = _left_pad(rows, chat.pad_token_id)
    kw = dict(max_new_tokens=9, stop_token_ids=chat.stop_token_ids, pad_token_id=chat.pad_token_id)
    expected = chat.generator.generate(ids, mask, **kw).tokens
    assert graphed.generate(ids, mask, **kw).tokens == expected
    assert len(graphed._graphs) == 1
    assert graphed.generate(ids, mask, **kw).tokens == expected  # replayed with a fresh mask
    single = chat.generator.generate(torch.tensor([rows[0]]), **kw).tokens
    assert graphed.generate(torch.tensor([rows[0]]), **kw).tokens == single
    assert len(graphed._graphs) == 2
