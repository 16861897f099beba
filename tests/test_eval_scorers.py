"""Scorers against goldens produced by the official scripts (see tests/data/eval/README.md)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from interleaf.errors import InputError
from interleaf.eval import mmiu, mmniah, tvr

DATA = Path(__file__).parent / "data" / "eval"


# ------------------------------------------------------------------------------------------ MM-NIAH


def test_mmniah_is_correct_matches_official_per_record():
    expected = json.loads((DATA / "mmniah" / "expected_is_correct.json").read_text())
    n = 0
    for name, values in expected.items():
        _, task, _ = mmniah.parse_result_name(name)
        records = mmniah.read_jsonl(DATA / "mmniah" / "results" / name)
        assert len(records) == len(values)
        for rec, want in zip(records, values):
            got = mmniah.is_correct(mmniah.task_answer(task, rec["answer"]), rec["response"])
            assert got == pytest.approx(want, abs=1e-12), (name, rec)
            n += 1
    assert n == 600


def test_mmniah_scores_match_official_per_split_task_and_bin():
    files = sorted((DATA / "mmniah" / "results").glob("*.jsonl"))
    got = mmniah.score_files(files)
    expected = json.loads((DATA / "mmniah" / "expected_scores.json").read_text())
    assert set(got) == set(expected)
    for model, splits in expected.items():
        assert set(got[model]) == set(splits)
        for split, official in splits.items():
            summary = got[model][split]
            assert official["context_ranges"] == mmniah.CONTEXT_RANGES
            for key, scores in official.items():
                if key == "context_ranges":
                    continue
                ours = summary["overall"] if key == "overall" else summary["tasks"][key[: -len(split) - 1]]
                assert len(scores) == 11
                assert ours["scores"] == pytest.approx(scores, abs=1e-6)
                assert ours["overall"] == pytest.approx(sum(scores) / 11, abs=1e-6)
            assert ("overall" in summary) == ("overall" in official)


def test_mmniah_official_scores_json_layout():
    recs = mmniah.read_jsonl(DATA / "mmniah" / "results" / "mymodel_retrieval-text-val.jsonl")
    ts = mmniah.score_records(recs, "retrieval-text", "mymodel", "val")
    out = mmniah.official_scores_json([ts])
    assert list(out) == ["retrieval-text-val", "context_ranges"]
    assert ts.n_dropped_short == sum(1 for r in recs if r["context_length"] < 1000)


@pytest.mark.parametrize(
    "answer,response,want",
    [
        (2, "C", 1), (2, "c.", 1), (2, "**C**", 1), (2, "The answer is C.", 1), (0, "The camera is moving left", 1),
        (1, "the camera is moving right.", 1), (2, "2", 1), (2, "AC", 0), (0, "none", 0), (3, "D. because", 1),
        ([1, 2, 3], "[1, 2, 3]", 1), ([1, 2, 3], "```json\n[1, 2]\n```", 2 / 3), ([1, 2], '{"a": [1], "b": [2]}', 1),
        ([1, 2], "[2, 1, 5]", 0), ([1, 2], "two", 0), ("oak", "It is an Oak tree.", 1), ("new york", "New-York", 1),
        ("3", "three", 1), ("don't", "dont", 1), ("cat", "cats", 0),
    ],
)  # fmt: skip
def test_mmniah_is_correct_cases(answer, response, want):
    assert mmniah.is_correct(answer, response) == pytest.approx(want)


def test_mmniah_bins():
    assert mmniah.length_bin(999) == 0 and mmniah.length_bin(1000) == 1 and mmniah.length_bin(64000) == 11
    assert mmniah.depth_bin(1.0) == 4 and mmniah.depth_bin([0.1, 0.3]) == 1
    assert mmniah.depth_bin(0.6) == 2  # int(0.6 / 0.2) == 2 in floating point, as upstream


def _niah_record(**kw):
    rec = {
        "id": 7, "images_list": ["a.jpg"], "context": "hay <image> stack", "question": "Which?", "answer": 1,
        "meta": {"placed_depth": [0.5], "context_length": 1500, "choices": None, "choices_image_path": None},
    }  # fmt: skip
    rec.update(kw)
    return rec


def test_mmniah_prompts_as_official_get_input():
    rec = _niah_record(meta={**_niah_record()["meta"], "choices": ["red", "blue"]})
    ctx, images, q, _ = mmniah.build_input(rec)
    assert q == "Which?\nA. red\nB. blue\nAnswer with the option's letter from the given choices directly."
    assert images == ["a.jpg"] and ctx == "hay <image> stack"
    rec = _niah_record(meta={**_niah_record()["meta"], "choices_image_path": ["o1.png", "o2.png"]})
    _, images, q, _ = mmniah.build_input(rec)
    assert q.endswith(
        "\nA. <image>\nB. <image>\nAnswer with the option's letter from the given choices directly."
    )
    assert images == ["a.jpg", "o1.png", "o2.png"]
    _, _, q, _ = mmniah.build_input(_niah_record(answer=[1, 2]))
    assert q == "Which?\nAnswer the question using a single word or phrase."
    with pytest.raises(InputError, match="placeholders"):
        mmniah.build_input(_niah_record(images_list=[]))


def test_mmniah_loader_counts_bad_records(tmp_path):
    ann = tmp_path / "mm_niah_val" / "annotations"
    ann.mkdir(parents=True)
    good = _niah_record()
    bad = {k: v for k, v in _niah_record().items() if k != "answer"}
    (ann / "retrieval-image.jsonl").write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n{oops\n")
    samples, errors = mmniah.load_task(ann / "retrieval-image.jsonl", tmp_path / "mm_niah_val" / "images")
    assert len(samples) == 1 and len(errors) == 2
    assert "answer" in errors[0][1] and "invalid JSON" in errors[1][1]
    s = samples[0]
    assert s.prompt == "hay <image> stack\nWhich?\nAnswer the question using a single word or phrase."
    assert s.max_new_tokens == 16 and s.images[0].endswith("images/a.jpg")
    assert mmniah.find_split_dir(tmp_path / "mm_niah_val")[2] == "val"


def test_mmniah_bad_result_names():
    with pytest.raises(InputError, match="split"):
        mmniah.parse_result_name("model_retrieval-text.jsonl")
    assert mmniah.parse_result_name("a_b_c_retrieval-text-rag-test.jsonl") == (
        "a_b_c",
        "retrieval-text",
        "rag-test",
    )


def test_mmniah_official_overall_rounds_python_floats_as_upstream():
    # calculate_scores.save: round(v, 6) over np.mean(...).tolist(), i.e. Python floats. Bin 1K of
    # the six tasks: 0.566667 and five 0s, mean 0.566667 / 6 = 0.0944445 -> round() -> 0.094445
    # (round() of the np.float64 gave 0.094444).
    def ts(task, first):
        grid = [[0.0] * 5 for _ in range(11)]
        return mmniah.TaskScore("m", task, "val", [first] + [0.0] * 10, grid, [[0] * 5] * 11, 1, 0)

    tasks = [ts(t, 0.566667 if t == "retrieval-text" else 0.0) for t in mmniah.TASKS]
    overall = mmniah.official_scores_json(tasks)["overall"]
    assert overall == [0.094445] + [0.0] * 10
    assert all(type(v) is float for v in overall)


def test_mmniah_records_the_official_scorer_stops_on_are_per_record_errors():
    base = {"question_id": 0, "answer": 1, "response": "B", "context_length": 1500, "placed_depth": 0.5}
    recs = [
        {**base, "question_id": "none", "response": None},  # upstream: None.strip -> AttributeError
        {**base, "question_id": "sup", "response": "²"},  # isdigit() but int() -> ValueError
        {**base, "question_id": "deep", "placed_depth": 1.2},  # int(1.2 / 0.2) = 6 -> IndexError
        {**base, "question_id": "neg", "placed_depth": [-0.5, -0.5]},  # column -2: another depth's
        base,  # 1K bin, depth 0.4-0.6: correct (B = option 1)
        {**base, "response": "C", "placed_depth": -0.1},  # int(-0.5) = 0: depth bin 0 as upstream, wrong
        {**base, "placed_depth": [1.0, 1.0]},  # mean 1.0 -> 0.99: depth bin 4, correct
    ]
    ts = mmniah.score_records(recs, "retrieval-image")
    assert [(s["id"], s["error"].split(":")[0]) for s in ts.skipped] == [
        ("none", "field 'response' must be a string, got NoneType"),
        ("sup", "InputError"),
        ("deep", "InputError"),
        ("neg", "InputError"),
    ]
    assert "digit string" in ts.skipped[1]["error"] and "outside [0, 1]" in ts.skipped[2]["error"]
    assert ts.n_samples == 3 and ts.counts[0] == [1, 0, 1, 0, 1] and ts.grid[0] == [0.0, 0.0, 1.0, 0.0, 1.0]
    assert ts.scores[0] == 0.4 and not ts.warnings  # (0 + 0 + 1 + 0 + 1) / 5
    assert mmniah.is_parsed(1, "²") is False  # never raises: the runner asks it about every response
    # counting, empty ground truth: upstream returns 0 when the response is no list and divides by
    # zero (stops) when it is one
    cnt = [
        {**base, "question_id": q, "answer": [], "response": r} for q, r in (("a", "no list"), ("b", "[1]"))
    ]
    ts = mmniah.score_records(cnt, "counting-text")
    assert ts.n_samples == 1 and ts.scores == [0.0] * 11
    assert [s["id"] for s in ts.skipped] == ["b"] and "empty list" in ts.skipped[0]["error"]


# ------------------------------------------------------------------------------------------ TVR


@pytest.mark.parametrize(
    "name,kw",
    [("strict", {}), ("inclusive", {"inclusive": True}), ("strict_missing_zero", {"missing": "zero"})],
)
def test_tvr_ndcg_iou_matches_official(name, kw):
    gt = tvr.load_split(DATA / "tvr" / "gt.json")
    pred = tvr.load_predictions(DATA / "tvr" / "pred.json")
    expected = json.loads((DATA / "tvr" / "expected.json").read_text())[name]
    got = tvr.ndcg_iou(gt, pred, **kw)
    assert set(got) == set(expected) == {"NDCG@10", "NDCG@20", "NDCG@40"}
    for k, per_mu in expected.items():
        for mu, value in per_mu.items():
            assert got[k][mu] == pytest.approx(value, abs=1e-12)


def test_tvr_small_cases():
    gt = {
        1: [
            {"video_name": "v", "timestamp": [0, 10], "relevance": 4},
            {"video_name": "v", "timestamp": [20, 30], "relevance": 2},
        ]
    }
    # one exact hit on the best moment at rank 2, a half-overlap (IoU 0.5) at rank 1
    pred = {"1": [{"video_name": "v", "timestamp": [20, 25]}, {"video_name": "v", "timestamp": [0, 10]}]}
    strict = tvr.ndcg_iou(gt, pred, ks=(10,), mus=(0.5,))["NDCG@10"]["0.5"]
    ideal = 15 + 3 / math.log2(3)
    assert strict == pytest.approx((15 / math.log2(3)) / ideal)
    incl = tvr.ndcg_iou(gt, pred, ks=(10,), mus=(0.5,), inclusive=True)["NDCG@10"]["0.5"]
    assert incl == pytest.approx((3 + 15 / math.log2(3)) / ideal)
    with pytest.raises(InputError, match="not in the ground truth"):
        tvr.ndcg_iou(gt, {"2": []})


def test_tvr_bad_files(tmp_path):
    p = tmp_path / "gt.json"
    p.write_text(json.dumps([{"query_id": 1}]))
    with pytest.raises(InputError, match="relevant_moment"):
        tvr.load_split(p)
    p.write_text("{")
    with pytest.raises(InputError, match="not valid JSON"):
        tvr.load_predictions(p)


def test_tvr_missing_queries_warn_in_both_modes(caplog):
    gt = tvr.load_split(DATA / "tvr" / "gt.json")
    pred = tvr.load_predictions(DATA / "tvr" / "pred.json")
    dropped = sorted(pred)[:2]
    partial = {q: p for q, p in pred.items() if q not in dropped}
    n_absent = len(gt) - len(partial)
    res = {}
    for mode, words in (("skip", "skipped, as the official code"), ("zero", "counted as 0")):
        caplog.clear()
        with caplog.at_level("WARNING", logger="interleaf.eval.tvr"):
            res[mode] = tvr.ndcg_iou(gt, partial, ks=(10,), mus=(0.3,), missing=mode)["NDCG@10"]["0.3"]
        (rec,) = [r for r in caplog.records if "have no predictions" in r.getMessage()]
        assert (
            rec.getMessage() == f"{n_absent} of {len(gt)} ground-truth queries have no predictions ({words})"
        )
    # skip: the mean over the predicted queries; zero: the same sum over all queries
    assert res["zero"] == pytest.approx(res["skip"] * len(partial) / len(gt))
    caplog.clear()
    with caplog.at_level("WARNING", logger="interleaf.eval.tvr"):
        tvr.ndcg_iou({q: gt[q] for q in partial}, partial)
    assert not caplog.records  # nothing missing, nothing said


def test_tvr_video_corpus(tmp_path, caplog, capsys):
    from interleaf.cli import main

    gt = tvr.load_split(DATA / "tvr" / "gt.json")
    pred = tvr.load_predictions(DATA / "tvr" / "pred.json")
    videos = {m["video_name"] for ms in gt.values() for m in ms}
    corpus = {v: 90.0 for v in videos}
    path = tmp_path / "video_corpus.json"
    path.write_text(json.dumps(corpus))
    assert tvr.load_video_corpus(path) == corpus
    predicted = {p["video_name"] for ps in pred.values() for p in ps}
    with caplog.at_level("WARNING", logger="interleaf.eval.tvr"):
        n_unknown = tvr.check_videos(gt, pred, corpus)
    outside = sum(p["video_name"] not in videos for ps in pred.values() for p in ps)
    assert n_unknown == outside and (outside == 0) == (predicted <= videos)
    assert tvr.check_videos(gt, pred, {v: 1.0 for v in videos | predicted}) == 0
    with pytest.raises(InputError, match="is not in the video corpus"):
        tvr.check_videos(gt, pred, {"other": 1.0})
    for bad, match in (([1], "non-empty object"), ({}, "non-empty object"), ({"v": "90"}, "video 'v' must be"),
                       ({"v": True}, "must be a non-negative"), ({"v": -1}, "must be a non-negative")):  # fmt: skip
        path.write_text(json.dumps(bad))
        with pytest.raises(InputError, match=match):
            tvr.load_video_corpus(path)
    # the CLI checks the names when given the corpus, and scores as without it
    path.write_text(json.dumps(corpus))
    args = ["eval", "score", "tvr-ranking", "--gt", str(DATA / "tvr" / "gt.json"), "--pred",
            str(DATA / "tvr" / "pred.json"), "--json"]  # fmt: skip
    assert main(args) == 0
    plain = capsys.readouterr().out
    assert main([*args, "--video-corpus", str(path)]) == 0
    assert capsys.readouterr().out == plain
    path.write_text(json.dumps({"other": 1.0}))
    assert main([*args, "--video-corpus", str(path)]) == 1
    assert "is not in the video corpus" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ MMIU


def rule_judge(prompt: str) -> str:
    """The rule-based judge the goldens were made with (tests/data/eval/README.md)."""
    ex3 = prompt.split("Example 3: \n", 1)[1]
    opts = ex3.split("\nOptions: ", 1)[1].split("\nAnswer: ", 1)[0]
    ans = ex3.split("\nAnswer: ", 1)[1].rsplit("\nYour output: ", 1)[0]
    if "FAIL" in ans:
        raise RuntimeError("judge down")
    for line in opts.splitlines():
        m = re.match(r"([A-Z]): (.*)$", line)
        if m and m.group(2).lower() in ans.lower():
            return " " + m.group(1) + "\n"
    return "Z"


def test_mmiu_extraction_and_scores_match_official():
    records = mmniah.read_jsonl(DATA / "mmiu" / "predictions.jsonl")
    expected = json.loads((DATA / "mmiu" / "expected_judge.json").read_text())
    prompts = []

    def judge(p):
        prompts.append(p)
        return rule_judge(p)

    scores, rows = mmiu.score(records, judge=judge)
    assert [r["choice"] for r in rows] == [c.strip() for c in expected["choices"]]
    assert all(p in prompts for p in expected["judge_prompts_first3"])  # judge calls run concurrently
    for task, acc in expected["accuracy"].items():
        got = scores["overall"] if task == "Overall" else scores["per_task"][task]["accuracy"]
        assert got == pytest.approx(acc, abs=1e-12)
    assert scores["extraction_counts"]["judge_error"] > 0
    assert scores["num_skipped"] == sum(1 for r in rows if r["correct"] is None)


def test_mmiu_matcher_without_judge():
    opts = mmiu.parse_options("A: red car\nB: car\nC: blue sky\nD: 12.5 meters")
    assert mmiu.match_option("I think it is the red car.", opts) == "A"
    assert mmiu.match_option("a car", opts) == "B"
    assert mmiu.match_option("Answer: C", opts) == "C"
    assert mmiu.match_option("(D) because", opts) == "D"
    assert mmiu.match_option("E. nothing", opts) == "Z"
    assert mmiu.match_option("the blue sky and a car", opts) == "Z"  # two unrelated options: ambiguous
    assert mmiu.match_option("no idea", opts) == "Z"
    rec = {"question": "q", "options": "A: red car\nB: car"}
    assert mmiu.extract_choice(rec, " (b). ") == ("b", "letter")
    assert mmiu.extract_choice(rec, "AB") == ("Z", "matcher")
    assert mmiu.extract_choice(rec, "image none") == ("Z", "refusal")
    assert mmiu.extract_choice(rec, "x", judge=lambda p: 1 / 0) == ("GPT error", "judge_error")
    records = mmniah.read_jsonl(DATA / "mmiu" / "predictions.jsonl")
    scores, _ = mmiu.score(records)
    assert scores["extraction"].endswith("deterministic matcher")
    assert "judge" not in scores["extraction_counts"]


def _mmiu_rec(task, **kw):
    rec = {
        "task": task, "visual_input_component": "natural image", "source": "s", "options": "A: x\nB: y",
        "question": "Q?", "context": "C.", "input_image_path": ["./2D-spatial/t/a_0_0.jpg"], "output": "A",
    }  # fmt: skip
    rec.update(kw)
    return rec


def test_mmiu_prompt_order_rule():
    assert len(mmiu.TASKS_EXIST) == 23
    assert (
        mmiu.build_text(_mmiu_rec("person_reid"))
        == "Q?\nC.\nPlease answer the option directly like A,B,C,D..."
    )
    assert (
        mmiu.build_text(_mmiu_rec("jigsaw_puzzle_solving"))
        == "C.\nQ?\nPlease answer the option directly like A,B,C,D..."
    )


def test_mmiu_loaders_all_json_parquet_nested(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    recs = [_mmiu_rec("jigsaw_puzzle_solving"), _mmiu_rec("person_reid", output="B"), {"task": "x"}]
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "all.json").write_text(json.dumps(recs))
    samples, errors = mmiu.load(tmp_path / "a")
    assert len(samples) == 2 and len(errors) == 1 and "options" in errors[0][1]
    assert samples[0].images == [str(tmp_path / "a" / "2D-spatial/t/a_0_0.jpg")]
    assert samples[0].missing_images and samples[0].relationship == "2D-spatial"
    (tmp_path / "b").mkdir()
    pq.write_table(pa.Table.from_pylist(recs[:2]), tmp_path / "b" / "all.parquet")
    ps, _ = mmiu.load(tmp_path / "b")
    assert [s.text for s in ps] == [s.text for s in samples]
    nested = [
        {"task": r["task"], "options": r["options"], "output": {"output_text": r["output"]},
         "input": {"input_image_path": r["input_image_path"], "question": r["question"], "context": r["context"]}}
        for r in recs[:2]
    ]  # fmt: skip
    (tmp_path / "c" / "2D-spatial").mkdir(parents=True)
    (tmp_path / "c" / "2D-spatial" / "2D-spatial.json").write_text(json.dumps(nested))
    ns, _ = mmiu.load(tmp_path / "c")
    assert [s.text for s in ns] == [s.text for s in samples]
    assert [s.record["output"] for s in ns] == ["A", "B"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no all.json"):
        mmiu.load(tmp_path / "empty")


def test_mmiu_baselines_and_relationships():
    recs = [_mmiu_rec("person_reid", output=o, options="A: 1\nB: 2\nC: 3\nD: 4", response="A") for o in "AAB"]
    recs += [_mmiu_rec("jigsaw_puzzle_solving", output=o, response="B") for o in "AB"]
    scores, _ = mmiu.score(recs)
    assert scores["baselines"]["random"] == pytest.approx((0.25 + 0.5) / 2)
    assert scores["baselines"]["frequency"] == pytest.approx((2 / 3 + 0.5) / 2)
    assert scores["overall"] == pytest.approx((2 / 3 + 0.5) / 2)
    assert scores["micro_accuracy"] == pytest.approx(3 / 5)
    assert set(scores["per_relationship"]) == {"High-level-obj-semantic", "2D-spatial"}
    # a record without a string response is skipped and listed, never raised
    scores, rows = mmiu.score([_mmiu_rec("x")])
    assert scores["skipped"] == {
        "count": 1,
        "samples": [{"id": "record 0", "error": "has no string field 'response'"}],
    }
    assert scores["num_scored"] == 0 and rows[0]["skipped"]


@pytest.mark.parametrize(
    "which,content,words",
    [
        ("gt", b"\xff\xfe[]", "cannot read (UnicodeDecodeError"),
        ("gt", '[{"query_id": 1, "relevant_moment": 5}]', "query 1 field 'relevant_moment' must be a list"),
        ("gt", '[{"query_id": 1, "relevant_moment": [5]}]', "query 1 moment 0 is not an object"),
        ("gt", '[{"query_id": 1, "relevant_moment": [{"video_name": "v", "timestamp": [0, 1], "relevance": "x"}]}]',
         "query 1 moment 0 field 'relevance' must be a number"),
        ("pred", '{"1": [5]}', "query 1 prediction 0 is not an object"),
        ("pred", '{"1": [{"video_name": "v", "timestamp": 3}]}', "query 1 prediction 0 field 'timestamp'"),
        ("pred", '{"1": [{"video_name": "v", "timestamp": ["a", "b"]}]}', "query 1 prediction 0 field 'timestamp'"),
        ("pred", '{"1": [{"video_name": ["v"], "timestamp": [0, 1]}]}', "prediction 0 field 'video_name'"),
    ],
)  # fmt: skip
def test_tvr_cli_names_the_file_and_field_of_wrong_typed_input(tmp_path, capsys, which, content, words):
    # each of these once ended in a bare TypeError / UnicodeDecodeError naming neither file nor field
    from interleaf.cli import main

    files = {"gt": tmp_path / "gt.json", "pred": tmp_path / "pred.json"}
    files["gt"].write_text('[{"query_id": 1, "relevant_moment": []}]')
    files["pred"].write_text('{"1": []}')
    bad = files[which]
    bad.write_bytes(content if isinstance(content, bytes) else content.encode())
    assert main(["eval", "score", "tvr-ranking", "--gt", str(files["gt"]), "--pred", str(files["pred"])]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {bad}: ") and words in err and "\n" not in err


@pytest.mark.parametrize("flag,value", [("--k", "0"), ("--k", "-1"), ("--mu", "2"), ("--mu", "-0.5")])
def test_tvr_cli_refuses_impossible_k_and_mu(capsys, flag, value):
    # --k -1 once printed an "NDCG@-1" score (a slice dropping the last prediction), --mu 2 all zeros
    from interleaf.cli import main

    args = ["eval", "score", "tvr-ranking", "--gt", str(DATA / "tvr" / "gt.json"),
            "--pred", str(DATA / "tvr" / "pred.json"), flag, value]  # fmt: skip
    assert main(args) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {flag} must be") and "\n" not in err
