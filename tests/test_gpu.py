"""The CUDA paths against the CPU on tiny fp32 checkpoints (InternVL, Mono-InternVL): the static KV
cache with its causal prefill, the CUDA-graph decode step, the left-padded batch with one vision
pass, the row-wise prefill.

Skipped without a GPU (CI has none); run them on a GPU machine: ``pytest tests/test_gpu.py``.
"""

from __future__ import annotations

import pytest
import torch

from interleaf.generation.chat import ChatModel
from interleaf.model.mono_checkpoint import init_mono_model, load_mono_chat

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module", params=["internvl", "mono", "mono-attention-experts"])
def pair(request, tiny_ckpt_hf, tmp_path_factory):
    """The same fp32 checkpoint as a CPU and a CUDA ChatModel: InternVL, Mono-InternVL (FFN experts),
    Mono-InternVL with visual attention experts."""
    if request.param == "internvl":
        load, path = ChatModel.from_pretrained, tiny_ckpt_hf
    else:
        out = tmp_path_factory.mktemp("mono") / request.param
        path = init_mono_model(
            "tiny-mono", out, seed=3, visual_attention_experts="attention" in request.param
        )
        load = load_mono_chat
    # full fp32 matmuls and convolutions, so the GPU computes what the CPU computes
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield load(path), load(path, device="cuda")
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_static_cache_prefill_matches_cpu(pair, noise_image):
    cpu, gpu = pair
    _, ids, px, _ = cpu.prepare("What is in the image?", images=noise_image(0), max_num=2)
    ids = torch.tensor([ids])
    with torch.inference_mode():
        ref = cpu.model(input_ids=ids, pixel_values=px).logits
        cache = gpu.model.make_cache(1, ids.shape[1] + 100)
        cache.full_attention = True  # the generator's layout on CUDA
        out = gpu.model(input_ids=ids.cuda(), pixel_values=px.cuda(), kv_cache=cache).logits
    torch.testing.assert_close(out.cpu(), ref, atol=1e-4, rtol=1e-4)


def test_generation_matches_cpu(pair, noise_image):
    cpu, gpu = pair
    questions = ["What is in the image?", "Describe the colours of both pictures in detail, please.", "hi"]
    images = [noise_image(1), [noise_image(2, 300, 500), noise_image(3)], None]
    kw = dict(max_num=2, max_new_tokens=12)
    expected = [cpu.chat(q, im, **kw) for q, im in zip(questions, images)]
    assert all(expected)
    assert [gpu.chat(q, im, **kw) for q, im in zip(questions, images)] == expected
    assert gpu.batch_chat(questions, images, **kw) == expected  # left-padded prefill, graphed decode
    assert gpu.batch_chat(questions, images, prefill="rows", **kw) == expected
    assert gpu.batch_chat(questions, images, **kw) == expected  # graphs and caches reused
    # the decode steps really ran as CUDA graphs (a failed capture falls back to eager with a warning)
    assert gpu.generator.cuda_graphs and gpu.generator._graphs


def test_server_on_cuda_answers_as_the_cpu_does(pair, noise_image):
    """``interleaf serve`` on the GPU: concurrent requests (one RowBatch, CUDA-graph decode steps) get the
    CPU model's greedy replies."""
    from concurrent.futures import ThreadPoolExecutor

    import openai

    from interleaf.serve.protocol import ServerOptions
    from interleaf.serve.server import make_server
    from test_serve import data_url

    cpu, gpu = pair
    questions = ["What is in the image?", "Describe it in detail, please.", "Colours?"]
    images = [noise_image(4), noise_image(5, 300, 500), noise_image(6)]

    with make_server(gpu, ServerOptions(model_name="m", max_num=2), port=0).start() as server:
        client = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=120)

        def ask(k: int) -> str:
            content = [
                {"type": "image_url", "image_url": {"url": data_url(images[k])}},
                {"type": "text", "text": questions[k]},
            ]
            out = client.chat.completions.create(model="m", messages=[{"role": "user", "content": content}],
                                                 temperature=0, max_tokens=12)  # fmt: skip
            return out.choices[0].message.content

        with ThreadPoolExecutor(3) as pool:
            replies = list(pool.map(ask, range(3)))
    assert replies == [cpu.chat(q, im, max_num=2, max_new_tokens=12) for q, im in zip(questions, images)]
