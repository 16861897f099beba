"""The harness end to end on the tiny checkpoint: mini suites, batched vs reference, resume, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from interleaf.cli import main
from interleaf.errors import InputError
from interleaf.eval import mmniah, runner
from interleaf.eval.adapters import InterleafAdapter
from interleaf.eval.mini import make_mini_mmiu, make_mini_mmniah

DATA = Path(__file__).parent / "data" / "eval"


@pytest.fixture(scope="module")
def mini(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mini")
    return {
        "mmiu": make_mini_mmiu(root / "mmiu", per_task=1, seed=0).parent,
        "mmniah": make_mini_mmniah(root / "niah", per_task=1, seed=0, lengths=(1000,)),
    }


def _preds(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]


def test_mmiu_batched_matches_transformers_reference_and_resumes(mini, tiny_ckpt, tiny_ckpt_hf, tmp_path):
    out = tmp_path / "interleaf"
    scores = runner.run(
        str(tiny_ckpt), "mmiu", str(mini["mmiu"]), out, batch_size=4, max_new_tokens=6, progress=False
    )
    n = len(json.loads((mini["mmiu"] / "all.json").read_text()))
    assert scores["num_samples"] == n == 6 and scores["run"] == {"cached": 0, "generated": n, "failed": 0}
    assert scores["num_tasks"] == 6 and len(scores["per_relationship"]) == 5
    assert scores["errors"]["count"] == 0
    for name in ("predictions.jsonl", "scores.json", "report.md", "responses.sqlite"):
        assert (out / name).is_file()
    ours = _preds(out)
    assert all(p["response"] for p in ours) and {p["extraction"] for p in ours} <= {"letter", "matcher"}
    # transformers' InternVL on the same weights answers the same (greedy, same prompts and tiles)
    ref = runner.run(
        f"hf:{tiny_ckpt_hf}", "mmiu", str(mini["mmiu"]), tmp_path / "hf", max_new_tokens=6, progress=False
    )
    assert [p["response"] for p in _preds(tmp_path / "hf")] == [p["response"] for p in ours]
    assert ref["overall"] == scores["overall"]
    # rerun: everything comes from the store and the weights are never loaded
    adapter = InterleafAdapter(str(tiny_ckpt))
    again = runner.run(
        adapter, "mmiu", str(mini["mmiu"]), out, batch_size=4, max_new_tokens=6, progress=False
    )
    assert again["run"] == {"cached": n, "generated": 0, "failed": 0}
    assert adapter._chat_model is None
    assert _preds(out) == ours
    # another generation setting is another key: asked again
    other = runner.run(
        adapter, "mmiu", str(mini["mmiu"]), out, batch_size=4, max_new_tokens=3, limit=2, progress=False
    )
    assert other["run"]["generated"] == 2


def test_mmniah_end_to_end_official_layout(mini, tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "niah"
    rc = main(["eval", "run", "--model", str(tiny_ckpt), "--bench", "mmniah", "--data", str(mini["mmniah"]),
               "-o", str(out), "--batch-size", "3", "--max-new-tokens", "4", "--no-progress"])  # fmt: skip
    assert rc == 0
    scores = json.loads((out / "scores.json").read_text())
    assert scores["split"] == "val" and set(scores["tasks"]) == set(mmniah.TASKS) and "overall" in scores
    files = sorted((out / "mmniah_results").glob("*.jsonl"))
    assert [mmniah.parse_result_name(f)[1] for f in files] == sorted(mmniah.TASKS)
    assert all(mmniah.parse_result_name(f)[0] == Path(tiny_ckpt).name for f in files)
    assert len(list((out / "heatmaps").glob("*.png"))) == 6
    assert "| **Overall** |" in (out / "report.md").read_text()
    assert "![counting-text](heatmaps/counting-text.png)" in (out / "report.md").read_text()  # written
    official = json.loads((out / "mmniah_results" / "scores_val.json").read_text())
    assert len(official["overall"]) == 11
    # re-scoring the result files gives the same numbers
    capsys.readouterr()
    assert main(["eval", "score", "mmniah", *map(str, files), "--json"]) == 0
    rescored = json.loads(capsys.readouterr().out)[Path(tiny_ckpt).name]["val"]
    assert rescored["overall"] == scores["overall"]
    assert rescored["tasks"]["counting-text"]["scores"] == scores["tasks"]["counting-text"]["scores"]
    # the prompts are the official ones: context + "\n" + question with suffix, one tile per image
    rec = json.loads(files[0].read_text().splitlines()[0])
    assert rec["question"].endswith("\nAnswer the question using a single word or phrase.")


def test_cli_score_commands(capsys, tmp_path):
    assert main(["eval", "score", "tvr-ranking", "--gt", str(DATA / "tvr" / "gt.json"),
                 "--pred", str(DATA / "tvr" / "pred.json"), "--json"]) == 0  # fmt: skip
    res = json.loads(capsys.readouterr().out)
    expected = json.loads((DATA / "tvr" / "expected.json").read_text())["strict"]
    assert res["NDCG@20"]["0.5"] == pytest.approx(expected["NDCG@20"]["0.5"], abs=1e-12)
    # the official scores_<split>.json content, byte-for-byte values of calculate_scores.py
    assert main(["eval", "score", "mmniah", str(DATA / "mmniah" / "results"), "--official"]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads(
        (DATA / "mmniah" / "expected_scores.json").read_text()
    )
    assert main(["eval", "score", "mmiu", str(DATA / "mmiu" / "predictions.jsonl"), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["extraction"].endswith("deterministic matcher") and res["num_tasks"] == 10
    assert main(["eval", "score", "mmiu", str(DATA / "mmiu" / "predictions.jsonl")]) == 0
    assert "| Overall (mean over 10 tasks, official) |" in capsys.readouterr().out
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"task": "x"}\n')
    assert main(["eval", "score", "mmiu", str(bad)]) == 1
    assert "no field" in capsys.readouterr().err
    assert (
        main(
            [
                "eval",
                "run",
                "--model",
                "openai:nohash",
                "--bench",
                "mmiu",
                "--data",
                str(tmp_path),
                "-o",
                str(tmp_path / "o"),
            ]
        )
        == 1
    )
    assert "error:" in capsys.readouterr().err


def test_batched_paths_match_the_per_sample_loop(mini, tiny_ckpt):
    """Row-wise-prefill batches (CPU default), engine padded batches and the loop answer the same."""
    items = runner.mmiu_items(str(mini["mmiu"]), 4, 5, None)
    reqs = [it.request for it in items]
    adapter = InterleafAdapter(str(tiny_ckpt))
    loop = [adapter._one(r) for r in reqs]
    rowwise = dict(adapter.generate(reqs, batch_size=4))
    adapter.rowwise_prefill_on_cpu = False
    padded = dict(adapter.generate(reqs, batch_size=4))
    assert [rowwise[i] for i in range(4)] == loop == [padded[i] for i in range(4)]
    assert len({len(r.images) for r in reqs}) > 1  # different tile budgets share the batch


def test_qwen3_cli_batches_answer_as_one_sample_chats_and_transformers(mini, tmp_path):
    """InternVL3.5's LLM family (tiny-qwen3: per-head q/k norms, head_dim != width / heads) through
    ``interleaf eval run``: batched answers (mixed tile budgets) = ``ChatModel.chat`` one sample at a
    time = transformers' InternVL on the same -hf checkpoint."""
    from interleaf.model import init_model

    ckpt = init_model("tiny-qwen3", tmp_path / "qwen3", layout="hf", seed=0)
    out = tmp_path / "out"
    assert main(["eval", "run", "--model", str(ckpt), "--bench", "mmiu", "--data", str(mini["mmiu"]),
                 "-o", str(out), "--limit", "4", "--batch-size", "4", "--max-new-tokens", "6",
                 "--no-progress"]) == 0  # fmt: skip
    batched = [p["response"] for p in _preds(out)]
    reqs = [it.request for it in runner.mmiu_items(str(mini["mmiu"]), 4, 6, None)]
    assert len({len(r.images) for r in reqs}) > 1 and all(batched)
    assert batched == [InterleafAdapter(str(ckpt))._one(r) for r in reqs]
    runner.run(
        f"hf:{ckpt}", "mmiu", str(mini["mmiu"]), tmp_path / "hf", limit=4, max_new_tokens=6, progress=False
    )
    assert [p["response"] for p in _preds(tmp_path / "hf")] == batched


def test_fingerprint_reads_every_byte_of_every_file(tmp_path):
    from interleaf.eval.adapters import directory_fingerprint

    rng = np.random.default_rng(0)
    weights = rng.integers(0, 256, 5 << 20, dtype=np.uint8).tobytes()
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        (d / "sub").mkdir(parents=True)
        (d / "config.json").write_text("{}")
        (d / "sub" / "extra.bin").write_bytes(b"x" * 10)
    middle = len(weights) // 2
    (a / "model.safetensors").write_bytes(weights)
    (b / "model.safetensors").write_bytes(
        weights[:middle] + bytes([weights[middle] ^ 1]) + weights[middle + 1 :]
    )
    assert directory_fingerprint(a) != directory_fingerprint(b)  # same size, same first/last MiB
    (b / "model.safetensors").write_bytes(weights)
    assert directory_fingerprint(a) == directory_fingerprint(b)
    (b / "sub" / "extra.bin").write_bytes(b"y" * 10)  # files in subfolders count too
    assert directory_fingerprint(a) != directory_fingerprint(b)
    (b / "sub" / "extra.bin").rename(b / "extra.bin")
    assert directory_fingerprint(a) != directory_fingerprint(b)
    before = directory_fingerprint(a)
    (a / ".cache" / "huggingface").mkdir(parents=True)  # hub download metadata, a git folder: not the model
    (a / ".cache" / "huggingface" / "model.safetensors.metadata").write_text("etag 1")
    (a / ".gitattributes").write_text("*.safetensors filter=lfs")
    assert directory_fingerprint(a) == before


def test_output_inside_the_checkpoint_resumes(mini, tiny_ckpt, tmp_path):
    # `-o CKPT/eval`: the run's own files are not the model, so a rerun still finds its answers
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, ckpt)
    args = ("mmiu", str(mini["mmiu"]), ckpt / "eval")
    first = runner.run(str(ckpt), *args, limit=2, max_new_tokens=4, progress=False)
    assert first["run"] == {"cached": 0, "generated": 2, "failed": 0}
    rest = runner.run(str(ckpt), *args, max_new_tokens=4, progress=False)
    assert rest["run"] == {"cached": 2, "generated": 4, "failed": 0}
    (ckpt / "config.json").write_text((ckpt / "config.json").read_text() + "\n")  # the model's files count
    again = runner.run(str(ckpt), *args, limit=1, max_new_tokens=4, progress=False)
    assert again["run"]["generated"] == 1
    # the model's folder itself as the output: nothing would be left to fingerprint
    with pytest.raises(InputError, match="the output folder is the model's folder"):
        runner.run(str(ckpt), "mmiu", str(mini["mmiu"]), ckpt, limit=1, progress=False)


def test_dtype_and_device_kind_are_in_the_resume_key(mini, tiny_ckpt, tiny_ckpt_hf):
    import torch

    from interleaf.eval.adapters import HFAdapter

    base = InterleafAdapter(str(tiny_ckpt))
    bf16 = InterleafAdapter(str(tiny_ckpt), dtype=torch.bfloat16)
    assert base.settings() == {"do_sample": False, "dtype": "stored", "device": "cpu"}
    assert bf16.settings()["dtype"] == InterleafAdapter(str(tiny_ckpt), dtype="bfloat16").settings()["dtype"]
    assert InterleafAdapter(str(tiny_ckpt), device="cuda:1").settings()["device"] == "cuda"
    assert HFAdapter(str(tiny_ckpt_hf), dtype="float16").settings()["dtype"] == "float16"
    keys = []
    for adapter in (base, bf16, InterleafAdapter(str(tiny_ckpt), device="cuda")):
        items = runner.mmiu_items(str(mini["mmiu"]), 2, 5, None)
        runner._keys(items, adapter)  # keys only: nothing is loaded
        keys.append([it.key for it in items])
    assert len({k for ks in keys for k in ks}) == 6
    assert base._chat_model is None


def test_tile_budgets_reach_the_adapter(tiny_ckpt, tmp_path):
    """MMIU: VLMEvalKit's InternVL budget, min(6, 64 // n) tiles per image (+ thumbnail); MM-NIAH: one
    448 tile per image, whatever its shape (the official setting)."""
    from PIL import Image

    Image.new("RGB", (6 * 448, 448), (10, 20, 30)).save(tmp_path / "wide.png")  # 6:1 fills any budget
    adapter = InterleafAdapter(str(tiny_ckpt))
    recs = [
        {"task": "jigsaw_puzzle_solving", "options": "A: x\nB: y", "question": "Q?", "context": "C.",
         "input_image_path": ["wide.png"] * n, "output": "A"}
        for n in (1, 11, 16)
    ]  # fmt: skip
    (tmp_path / "all.json").write_text(json.dumps(recs))
    items = runner.mmiu_items(str(tmp_path), None, 4, None)
    assert [it.request.max_num for it in items] == [runner.mmiu_tiles(n) for n in (1, 11, 16)] == [6, 55, 64]
    tiles = [px.shape[0] for _, px in adapter._prepare([it.request for it in items])]
    assert tiles == [1 * (6 + 1), 11 * (5 + 1), 16 * (4 + 1)]
    ann = tmp_path / "mm_niah_val" / "annotations"
    ann.mkdir(parents=True)
    (tmp_path / "mm_niah_val" / "images").mkdir()
    (tmp_path / "mm_niah_val" / "images" / "wide.png").write_bytes((tmp_path / "wide.png").read_bytes())
    rec = {"id": 0, "images_list": ["wide.png"] * 3, "context": "<image> a <image> b <image>", "question": "Q?",
           "answer": "a", "meta": {"placed_depth": 0.5, "context_length": 1500}}  # fmt: skip
    (ann / "retrieval-text.jsonl").write_text(json.dumps(rec) + "\n")
    (item,), _ = runner.mmniah_items(str(tmp_path / "mm_niah_val"), None, None, None)
    assert (item.request.max_num, item.request.dynamic) == (1, False)
    assert [px.shape[0] for _, px in adapter._prepare([item.request])] == [3]
    # images kept elsewhere (the official mm_niah.json names the image root apart from the annotations)
    (tmp_path / "mm_niah_val" / "images").rename(tmp_path / "elsewhere")
    (item,), _ = runner.mmniah_items(str(tmp_path / "mm_niah_val"), None, None, None)
    assert item.error and item.error.startswith("missing image")
    (item,), _ = runner.mmniah_items(
        str(tmp_path / "mm_niah_val"), None, None, None, str(tmp_path / "elsewhere")
    )
    assert item.error is None and [px.shape[0] for _, px in adapter._prepare([item.request])] == [3]
