"""The CUDA paths against the CPU on tiny fp32 checkpoints (InternVL, Mono-InternVL, LCL): the static KV
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


def test_lcl_forward_and_a_bf16_step_on_the_gpu(tmp_path):
    """LCL on CUDA: fp32 outputs equal the CPU's; a bf16-autocast training run keeps finite losses."""
    import json

    from PIL import Image

    from interleaf.model.lcl import LCL_PRESETS, LCLConfig, LCLModel, lcl_loss
    from interleaf.train.lcl import LCLDataset, LCLTrainConfig, collate, load_lcl_tokenizer, pretrain

    rows = []
    for k, colour in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200), (220, 220, 30)]):
        Image.new("RGB", (48, 40), colour).save(tmp_path / f"{k}.png")
        rows.append({"image": f"{k}.png", "text": f"picture {k} in one colour"})
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = load_lcl_tokenizer("offline")
    cfg = LCLConfig(**{**LCL_PRESETS["tiny"], "vocab_size": len(tok), "special_token_ids": dict(tok.ids)})
    ds = LCLDataset([str(tmp_path / "pairs.jsonl")], tok, cfg, img_first_prob=0.0)
    ids, pixels = collate([ds.get(i) for i in range(len(ds))])
    torch.manual_seed(0)
    cpu = LCLModel(cfg)
    gpu = LCLModel(cfg).cuda()
    gpu.load_state_dict(cpu.state_dict())
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        want = lcl_loss(cpu(pixels, ids))
        got = lcl_loss(gpu(pixels.cuda(), ids.cuda()))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    for a, b in zip(want, got):
        assert torch.allclose(a, b.cpu(), atol=1e-4)
    run = LCLTrainConfig(data=[str(tmp_path / "pairs.jsonl")], output_dir=str(tmp_path / "run"), steps=5,
                         batch_size=4, warmup=1, device="cuda", precision="bf16")  # fmt: skip
    pretrain(run, log=lambda m: None)
    log = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert len(log) == 5 and all(torch.isfinite(torch.tensor(r["loss"])) for r in log)


def test_visionllm_losses_and_training_on_the_gpu(tmp_path):
    """VisionLLM v2 on CUDA: the LM and detector losses equal the CPU's; `visionllm train --device cuda`
    runs and writes a model that `detect` reads; with --deterministic it refuses in one line."""
    import copy
    import json

    from PIL import Image

    from interleaf.errors import InputError
    from interleaf.model.visionllm import init_visionllm
    from interleaf.train.visionllm import (
        collate_detection,
        detect_command,
        encode_detection,
        init_command,
        read_records,
        train_command,
    )

    img = Image.new("RGB", (224, 224), (128, 128, 128))
    img.paste((220, 30, 30), (20, 30, 90, 100))
    img.save(tmp_path / "a.png")
    row = {
        "image": "a.png",
        "objects": [{"phrase": "red square", "box": [20, 30, 90, 100]}],
        "phrases": ["red square", "dog"],
    }
    (tmp_path / "d.jsonl").write_text(json.dumps(row) + "\n")
    records, _ = read_records(tmp_path / "d.jsonl")
    cpu, tok = init_visionllm("tiny", seed=0)
    cpu.config.force_image_size, cpu.config.max_dynamic_patch, cpu.link.detector_size = 224, 1, 128
    gpu = copy.deepcopy(cpu).cuda()
    batch = collate_detection([encode_detection(cpu, tok, records[0])], 0, 128)
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        want = cpu(**batch)
        moved = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
        moved["det_targets"] = [{k: v.cuda() for k, v in t.items()} for t in batch["det_targets"]]
        got = gpu(**moved)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    assert torch.allclose(want.lm_loss, got.lm_loss.cpu(), atol=1e-4)
    assert torch.allclose(want.det_loss, got.det_loss.cpu(), atol=1e-3)
    init = init_command(tmp_path / "init", image_size=224, max_tiles=1)
    summary = train_command(
        tmp_path / "d.jsonl", init, tmp_path / "run", steps=3, batch_size=1, device="cuda"
    )
    assert "3 steps" in summary
    # the detector's deformable attention samples with grid_sample, whose CUDA backward has no
    # deterministic kernel: --deterministic says so in one line instead of training irreproducibly
    with pytest.raises(InputError, match="no deterministic grid_sampler_2d_backward_cuda"):
        train_command(tmp_path / "d.jsonl", init, tmp_path / "det", steps=1, batch_size=1, device="cuda",
                      deterministic=True)  # fmt: skip
    result = detect_command(
        tmp_path / "run", tmp_path / "a.png", phrases="red square", threshold=0.0, device="cuda"
    )
    assert result["finish_reason"] in ("stop", "length")


def test_visionllm_generation_and_editing_on_the_gpu(tmp_path):
    """The [GEN] / [EDIT] tools on CUDA: the diffusion losses equal the CPU's (same seed, the noise drawn
    on the CPU generator), and a route's image is drawn and edited on the GPU."""
    import copy

    from PIL import Image

    from interleaf.model.visionllm import init_visionllm

    cpu, _ = init_visionllm("tiny", detector=False, gen="tiny", edit="tiny")
    gpu = copy.deepcopy(cpu).cuda()
    states = torch.randn(2, 64, cpu.config.llm.hidden_size)
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        for kind in ("gen", "edit"):
            inputs = images.flip(0) if kind == "edit" else None
            want = cpu.diffusion(kind).loss(states, images, ["a red square"] * 2, inputs,
                                            generator=torch.Generator().manual_seed(1))  # fmt: skip
            got = gpu.diffusion(kind).loss(states.cuda(), images.cuda(), ["a red square"] * 2,
                                           inputs.cuda() if inputs is not None else None,
                                           generator=torch.Generator().manual_seed(1))  # fmt: skip
            assert torch.allclose(want.loss, got.loss.cpu(), atol=1e-4), kind
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    drawn = gpu.sd.generate(states[:1].cuda(), num_inference_steps=3)
    edited = gpu.ip2p.generate(states[:1].cuda(), input_images=[Image.new("RGB", (64, 48), "red")],
                               num_inference_steps=3)  # fmt: skip
    assert drawn[0].size == (64, 64) and edited[0].size == (64, 48)


def test_visionllm_generation_training_resumes_exactly_on_the_gpu(tmp_path):
    """The diffusion losses draw noise, timesteps and cfg dropout from the GPU's generator: the train
    state keeps its state, so 2 + 2 steps equal 4 on CUDA too, with --deterministic (without it the
    UNet's atomics-summed backward kernels differ between any two runs in the last bits)."""
    import json

    from PIL import Image

    from interleaf.cli import main

    Image.new("RGB", (80, 64), "red").save(tmp_path / "red.png")
    Image.new("RGB", (64, 80), "blue").save(tmp_path / "blue.png")
    rows = [{"route": "gen", "caption": "a red square", "output_image": "red.png"},
            {"route": "edit", "image": "red.png", "caption": "make it blue", "output_image": "blue.png"}]  # fmt: skip
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    init = tmp_path / "init"
    assert main(["visionllm", "init", "-o", str(init), "--image-size", "112", "--max-tiles", "1",
                 "--gen", "tiny", "--edit", "tiny"]) == 0  # fmt: skip
    args = [str(tmp_path / "d.jsonl"), "--model", str(init), "--save-every", "2", "--batch-size", "1",
            "--device", "cuda", "--deterministic"]  # fmt: skip
    assert main(["visionllm", "train", *args, "--steps", "4", "-o", str(tmp_path / "whole")]) == 0
    assert main(["visionllm", "train", *args, "--steps", "2", "-o", str(tmp_path / "parts")]) == 0
    torch.cuda.manual_seed(12345)  # what a fresh process would hold: resuming must not depend on it
    assert main(["visionllm", "train", *args, "--steps", "4", "-o", str(tmp_path / "parts")]) == 0
    whole = (tmp_path / "whole" / "train_log.jsonl").read_text()
    assert (tmp_path / "parts" / "train_log.jsonl").read_text() == whole


def test_visionllm_lora_stage_training_and_detection_eval_on_the_gpu(tmp_path):
    """The training stages (LoRA + a frozen ViT, --grad-accum) and eval-det on CUDA: training runs
    and merges its adapters; the GPU's detections are the CPU's (fp32, TF32 off)."""
    import json

    from interleaf.cli import main
    from test_visionllm_train import _write, squares

    _write(tmp_path / "d.jsonl", squares(tmp_path, 3, seed=4, size=112))
    init = tmp_path / "init"
    assert main(["visionllm", "init", "-o", str(init), "--image-size", "112", "--max-tiles", "1"]) == 0
    assert main(["visionllm", "train", str(tmp_path / "d.jsonl"), "--model", str(init), "-o", str(tmp_path / "run"),
                 "--steps", "3", "--batch-size", "1", "--grad-accum", "2", "--lora-rank", "2", "--freeze", "vision",
                 "--device", "cuda"]) == 0  # fmt: skip
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        for device in ("cpu", "cuda"):
            assert main(["visionllm", "eval-det", str(tmp_path / "run"), str(tmp_path / "d.jsonl"), "-o",
                         str(tmp_path / f"ev-{device}"), "--device", device, "--topk", "5"]) == 0  # fmt: skip
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    rows = {d: [json.loads(x) for x in (tmp_path / f"ev-{d}" / "detections.jsonl").read_text().splitlines()]
            for d in ("cpu", "cuda")}  # fmt: skip
    for a, b in zip(rows["cpu"], rows["cuda"], strict=True):
        assert [d["score"] for d in b["detections"]] == pytest.approx(
            [d["score"] for d in a["detections"]], abs=1e-4
        )
        assert b["detections"][0]["box"] == pytest.approx(a["detections"][0]["box"], abs=0.05)
