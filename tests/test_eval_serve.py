"""The evaluation harness's OpenAI adapter against interleaf's own server (both real, on loopback)."""

from __future__ import annotations

import json

import pytest

import interleaf
from interleaf.eval import runner
from interleaf.eval.mini import make_mini_mmiu
from interleaf.serve.protocol import ServerOptions
from interleaf.serve.server import make_server


@pytest.fixture(scope="module")
def chat(tiny_ckpt):
    return interleaf.load(tiny_ckpt)


def test_eval_run_over_interleaf_serve_answers_as_the_model_does(chat, tmp_path):
    data = make_mini_mmiu(tmp_path / "mini" / "mmiu", per_task=1, seed=3).parent
    options = ServerOptions(model_name="tiny", max_num=2)
    with make_server(chat, options, port=0).start() as server:
        spec = f"openai:{server.url}#tiny"
        out = tmp_path / "out"
        scores = runner.run(
            spec, "mmiu", str(data), out, limit=4, max_new_tokens=6, concurrency=4, progress=False
        )
        assert scores["run"] == {"cached": 0, "generated": 4, "failed": 0}
        asked = server.scheduler.metrics["requests"]
        assert runner.run(spec, "mmiu", str(data), out, limit=4, max_new_tokens=6, progress=False)["run"] == {
            "cached": 4, "generated": 0, "failed": 0,
        }  # fmt: skip
        assert server.scheduler.metrics["requests"] == asked  # the rerun asked nothing again
    preds = {
        p["id"]: p["response"] for p in map(json.loads, (out / "predictions.jsonl").read_text().splitlines())
    }
    items = runner.mmiu_items(str(data), 4, 6, None)
    assert len(preds) == len(items) == 4
    for item in items:  # greedy: the reply the model gives the same prompt under the server's tile budget
        req = item.request
        assert len(req.images) >= 2  # text first ("Image-1: <image>..."): the prompt arrives as it was sent
        want = chat.chat(req.prompt, images=req.images, max_num=2, max_new_tokens=6)
        assert preds[item.id] == want
