"""Bad input never stops a run or a re-score: bad records are per-sample errors, bad result rows are
counted and skipped, unparsable answers are flagged and counted (the scores themselves unchanged)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from interleaf.cli import main
from interleaf.eval import mmiu, mmniah, runner
from interleaf.eval.adapters import Adapter
from interleaf.eval.mini import make_mini_mmiu, make_mini_mmniah

DATA = Path(__file__).parent / "data" / "eval"


class FixedAdapter(Adapter):
    """Answers every request with the same text (no model), recording the requests."""

    name = "fixed"

    def __init__(self, text: str):
        self.text, self.fingerprint, self.notes, self.requests = text, f"fixed:{text}", [], []

    def generate(self, requests, batch_size=8):
        for i, r in enumerate(requests):
            self.requests.append(r)
            yield i, self.text


def _preds(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def mini_niah(tmp_path_factory) -> Path:
    return make_mini_mmniah(tmp_path_factory.mktemp("niah"), per_task=2, seed=0, lengths=(1000,))


# ------------------------------------------------------------------------------------------ MM-NIAH

COUNTING = {
    "id": 90, "images_list": [], "context": "one apple, two apples", "question": "How many?",
    "answer": [1, 2], "meta": {"placed_depth": [0.2, 0.6], "context_length": 1500, "choices": None,
                               "choices_image_path": None},
}  # fmt: skip
# (field path, bad value, the field the error must name): each of these once ended a whole run
BAD_NIAH = [
    ("answer", "two", "answer"),
    ("meta.placed_depth", [], "meta.placed_depth"),
    ("meta.context_length", "1500", "meta.context_length"),
    ("meta.context_length", None, "meta.context_length"),
    ("images_list", None, "images_list"),
    ("context", None, "context"),
    ("meta.choices", "abc", "meta.choices"),
    ("id", {"x": 1}, "id"),
]


def _with(rec: dict, path: str, value) -> dict:
    rec = json.loads(json.dumps(rec))
    *parents, key = path.split(".")
    target = rec
    for p in parents:
        target = target[p]
    target[key] = value
    return rec


@pytest.mark.parametrize("path,value,field", BAD_NIAH)
def test_mmniah_loader_names_the_wrong_typed_field(tmp_path, path, value, field):
    ann = tmp_path / "counting-text.jsonl"
    ann.write_text(json.dumps(COUNTING) + "\n" + json.dumps(_with(COUNTING, path, value)) + "\n")
    samples, errors = mmniah.load_task(ann, tmp_path)
    assert [s.id for s in samples] == [90]
    assert len(errors) == 1 and errors[0][0] == "line2"
    assert f"field {field!r} must be" in errors[0][1] and f"got {type(value).__name__}" in errors[0][1]


def test_mmniah_loader_answer_type_per_task(tmp_path):
    mc = _with(COUNTING, "meta.choices", ["red", "blue"])
    ann = tmp_path / "retrieval-image.jsonl"
    ann.write_text(json.dumps(_with(mc, "answer", 1)) + "\n" + json.dumps(_with(mc, "answer", "B")) + "\n")
    samples, errors = mmniah.load_task(ann, tmp_path)
    assert len(samples) == 1 and "field 'answer' must be an option index (int), got str" in errors[0][1]
    # a counting answer stored as a JSON string is fine (decoded as upstream)
    ann = tmp_path / "counting-image.jsonl"
    ann.write_text(json.dumps(_with(COUNTING, "answer", "[1, 2]")) + "\n")
    assert len(mmniah.load_task(ann, tmp_path)[0]) == 1


def test_mmniah_run_goes_on_past_bad_records_and_counts_unparsable(mini_niah, tmp_path):
    data = tmp_path / "mm_niah_val"
    shutil.copytree(mini_niah, data)
    ann = data / "annotations" / "counting-text.jsonl"
    with open(ann, "a") as f:
        for path, value, _ in BAD_NIAH:
            f.write(json.dumps(_with(COUNTING, path, value)) + "\n")
    adapter = FixedAdapter("I am not sure")
    scores = runner.run(adapter, "mmniah", str(data), tmp_path / "out", progress=False)
    errors = scores["errors"]
    assert errors["count"] == len(BAD_NIAH) and errors["by_kind"] == {"bad_record": len(BAD_NIAH)}
    assert all("must be" in e["error"] for e in errors["samples"])
    assert len(adapter.requests) == 6 * 2  # every good sample was asked
    # "I am not sure" parses as no option letter and no JSON list; open answers have no parse notion
    tasks = scores["tasks"]
    for task in mmniah.TASKS:
        want = None if task in ("retrieval-text", "reasoning-text") else 2
        assert tasks[task]["unparsable"] == want, task
    assert scores["unparsable"] == 8
    rows = [p for p in _preds(tmp_path / "out") if "error" not in p]
    assert len(rows) == 12
    assert {p["parsed"] for p in rows if p["task"].startswith(("counting", "retrieval-image"))} == {False}
    open_tasks = ("retrieval-text", "reasoning-text")
    assert {p["parsed"] for p in rows if p["task"] in open_tasks} == {None}
    report = (tmp_path / "out" / "report.md").read_text()
    assert "Unparsable responses: 8" in report and "| n/a |" in report


def test_mmniah_model_errors_are_not_counted_as_unparsable():
    recs = [
        {"answer": 1, "response": "B", "context_length": 1500, "placed_depth": 0.5},
        {"answer": 1, "response": "maybe", "context_length": 1500, "placed_depth": 0.5},
        {"answer": 1, "response": "", "context_length": 1500, "placed_depth": 0.5, "error": "model error: x"},
    ]
    ts = mmniah.score_records(recs, "retrieval-image")
    assert ts.n_unparsed == 1 and ts.n_samples == 3
    open_answer = [{**recs[1], "answer": "oak"}]
    assert mmniah.score_records(open_answer, "retrieval-text").n_unparsed is None


@pytest.mark.parametrize(
    "answer,response,want",
    [
        (2, "C", True), (2, "The answer is C.", True), (2, "2", True), (0, "none", False), (2, "AC", False),
        (2, "I am not sure", False), ([1, 2], "```json\n[1, 2]\n```", True), ([1, 2], '{"a": [1]}', True),
        ([1, 2], "two", False), ([1, 2], '"[1]"', False), ("oak", "no idea", None),
    ],
)  # fmt: skip
def test_mmniah_is_parsed(answer, response, want):
    assert mmniah.is_parsed(answer, response) is want


def _result_rows() -> list[dict]:
    return mmniah.read_jsonl(DATA / "mmniah" / "results" / "mymodel_counting-text-val.jsonl")


def test_mmniah_scoring_skips_bad_rows_and_scores_the_rest_unchanged():
    good = _result_rows()
    bad = [
        {**good[0], "context_length": "1500"},
        {**good[1], "placed_depth": []},
        {**good[2], "answer": "two"},
        {k: v for k, v in good[3].items() if k != "response"},
        ["not", "an", "object"],
    ]
    want = mmniah.score_records(good, "counting-text")
    got = mmniah.score_records(bad[:2] + good + bad[2:], "counting-text")
    assert got.scores == want.scores and got.grid == want.grid and got.n_samples == len(good)
    assert [s["error"] for s in got.skipped] == [
        "field 'context_length' must be a number, got str",
        "field 'placed_depth' must be a number or a non-empty list of numbers, got list",
        "field 'answer' must be a list (or a JSON list string) for counting, got str",
        "no field 'response'",
        "record is not a JSON object",
    ]
    assert got.skipped[0]["id"] == good[0]["question_id"]
    assert got.skipped[4]["id"] == f"record {len(good) + 4}"


def test_cli_score_mmniah_reports_bad_rows_and_refuses_whole_bad_files(tmp_path, capsys):
    good = _result_rows()
    path = tmp_path / "m_counting-text-val.jsonl"
    lines = [json.dumps(r) for r in good] + ["{oops", json.dumps({**good[0], "placed_depth": None})]
    path.write_text("\n".join(lines) + "\n")
    assert main(["eval", "score", "mmniah", str(path), "--json"]) == 0
    task = json.loads(capsys.readouterr().out)["m"]["val"]["tasks"]["counting-text"]
    assert task["skipped"]["count"] == 2 and task["n_samples"] == len(good)
    assert [s["id"] for s in task["skipped"]["samples"]] == [f"line {len(good) + 1}", good[0]["question_id"]]
    assert task["scores"] == mmniah.score_records(good, "counting-text").scores
    path.write_text(json.dumps({**good[0], "context_length": None}) + "\n")
    assert main(["eval", "score", "mmniah", str(path)]) == 1
    assert "no scorable record" in capsys.readouterr().err
    path.write_text("not json\nat all\n")
    assert main(["eval", "score", "mmniah", str(path)]) == 1
    assert "not JSON lines" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ MMIU


@pytest.fixture(scope="module")
def mini_mmiu(tmp_path_factory) -> Path:
    return make_mini_mmiu(tmp_path_factory.mktemp("mmiu"), per_task=1, seed=0).parent


# (field, bad value, expected message part): each of these once ended a whole run
BAD_MMIU = [
    ("task", ["x"], "field 'task' must be a string, got list"),
    ("input_image_path", 5, "field 'input_image_path' must be a string or a list of strings, got int"),
    ("options", 3, "field 'options' must be a string or a list of strings, got int"),
    ("output", 1, "field 'output' must be a string or null, got int"),
    ("question", None, "has no field 'question'"),
]


def _bad_mmiu_data(mini_mmiu: Path, tmp_path: Path) -> tuple[Path, int]:
    data = tmp_path / "mmiu"
    shutil.copytree(mini_mmiu, data)
    recs = json.loads((data / "all.json").read_text())
    n_good = len(recs)
    recs += [{**recs[0], field: value} for field, value, _ in BAD_MMIU] + ["junk"]
    (data / "all.json").write_text(json.dumps(recs))
    return data, n_good


def test_mmiu_loader_names_the_wrong_typed_field(mini_mmiu, tmp_path):
    data, n_good = _bad_mmiu_data(mini_mmiu, tmp_path)
    samples, errors = mmiu.load(data)
    assert len(samples) == n_good
    assert [e[1].split(f"record {n_good + k} ", 1)[1] for k, e in enumerate(errors[:-1])] == [
        m for _, _, m in BAD_MMIU
    ]
    assert errors[-1][1].endswith(f"record {n_good + len(BAD_MMIU)} is not an object")


def test_mmiu_run_and_rescore_go_on_past_bad_records(mini_mmiu, tmp_path, capsys):
    data, n_good = _bad_mmiu_data(mini_mmiu, tmp_path)
    out = tmp_path / "out"
    scores = runner.run(FixedAdapter("A"), "mmiu", str(data), out, progress=False)
    n_bad = len(BAD_MMIU) + 1
    assert scores["errors"]["by_kind"] == {"bad_record": n_bad} and scores["num_scored"] == n_good
    # the run's own predictions re-score: the bad rows are skipped and listed, the rest scores the same
    capsys.readouterr()
    assert main(["eval", "score", "mmiu", str(out / "predictions.jsonl"), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["overall"] == scores["overall"] and res["per_task"] == scores["per_task"]
    assert res["skipped"]["count"] == n_bad
    assert [s["id"] for s in res["skipped"]["samples"]] == [e["id"] for e in scores["errors"]["samples"]]
    assert "must be a string" in res["skipped"]["samples"][0]["error"]
    # an invalid line and a row without a string response are reported too
    lines = (out / "predictions.jsonl").read_text().splitlines()
    row = json.loads(lines[0])
    (tmp_path / "p.jsonl").write_text("\n".join([*lines, "{oops", json.dumps({**row, "response": 3})]) + "\n")
    assert main(["eval", "score", "mmiu", str(tmp_path / "p.jsonl"), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["skipped"]["count"] == n_bad + 2 and res["num_scored"] == n_good
    assert {"id": f"line {len(lines) + 1}", "error": "not valid JSON (Expecting property name enclosed in "
            "double quotes)"} in res["skipped"]["samples"]  # fmt: skip
    assert {"id": row["id"], "error": "has no string field 'response'"} in res["skipped"]["samples"]
    (tmp_path / "p.jsonl").write_text("[1, 2]\n")
    assert main(["eval", "score", "mmiu", str(tmp_path / "p.jsonl")]) == 1
    assert "no scorable record (record 0: record is not a JSON object)" in capsys.readouterr().err


@pytest.mark.parametrize("answer,unparsed", [("I am not sure", True), ("A", False), ("(b).", False)])
def test_mmiu_unparsable_responses_are_flagged_and_counted(mini_mmiu, tmp_path, answer, unparsed):
    data = tmp_path / "mmiu"
    shutil.copytree(mini_mmiu, data)
    missing = json.loads((data / "all.json").read_text())[0]["input_image_path"][0]
    (data / missing).unlink()  # a sample never asked: no parse flag, not counted
    scores = runner.run(FixedAdapter(answer), "mmiu", str(data), tmp_path / "out", progress=False)
    preds = _preds(tmp_path / "out")
    assert preds[0]["parsed"] is None and preds[0]["error"].startswith("missing image")
    assert {p["parsed"] for p in preds[1:]} == {not unparsed}
    assert scores["unparsable"] == (len(preds) - 1 if unparsed else 0)
    assert sum(t["unparsable"] for t in scores["per_task"].values()) == scores["unparsable"]
    report = (tmp_path / "out" / "report.md").read_text()
    assert f"Unparsable responses (no option found): {scores['unparsable']}." in report


def test_mmiu_scores_unchanged_by_parse_flags_and_bad_rows():
    records = mmniah.read_jsonl(DATA / "mmiu" / "predictions.jsonl")
    clean, _ = mmiu.score(records)
    noisy, rows = mmiu.score([{"task": "x"}, *records, "junk"])
    for key in (
        "overall",
        "overall_paper_tasks",
        "micro_accuracy",
        "per_task",
        "per_relationship",
        "baselines",
    ):
        assert noisy[key] == clean[key], key
    assert noisy["skipped"]["count"] == 2 and rows[0]["skipped"] == "has no field 'options'"
    # the judge-less matcher leaves Z where no option text is found: those are the unparsable ones
    assert clean["unparsable"] == sum(1 for r in rows[1:-1] if r["choice"] == "Z" and r["parsed"] is False)


@pytest.mark.parametrize(
    "flag,value",
    [("--limit", "-1"), ("--limit", "0"), ("--batch-size", "0"), ("--max-new-tokens", "0"),
     ("--concurrency", "0"), ("--retries", "-1"), ("--timeout", "0")],
)  # fmt: skip
def test_cli_run_refuses_impossible_numeric_options(mini_mmiu, tmp_path, capsys, flag, value):
    # --limit -1 once dropped the last sample silently; --retries -1 made no request at all
    out = tmp_path / "out"
    args = ["eval", "run", "--model", "openai:http://127.0.0.1:9#m", "--bench", "mmiu",
            "--data", str(mini_mmiu), "-o", str(out), "--no-progress", flag, value]  # fmt: skip
    assert main(args) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {flag} must be") and "\n" not in err
    assert not out.exists()


def test_invalid_utf8_is_named_not_a_bare_decode_error(mini_mmiu, mini_niah, tmp_path, capsys):
    # an MMIU all.json with invalid UTF-8 ended the run in a bare UnicodeDecodeError naming no file
    bad = tmp_path / "all.json"
    bad.write_bytes(b"\xff\xfe[]")
    assert main(["eval", "run", "--model", "openai:http://127.0.0.1:9#m", "--bench", "mmiu",
                 "--data", str(bad), "-o", str(tmp_path / "o1"), "--no-progress"]) == 1  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {bad}: cannot read (UnicodeDecodeError") and "\n" not in err
    # in an MM-NIAH annotation file it stopped the whole run; now that line alone is a bad record
    data = tmp_path / "mm_niah_val"
    shutil.copytree(mini_niah, data)
    ann = data / "annotations" / "counting-text.jsonl"
    n_lines = len(ann.read_text().splitlines())
    with open(ann, "ab") as f:
        f.write(b'{"id": "\xff"}\n')
    samples, errors = mmniah.load_task(ann, data / "images")
    assert len(samples) == n_lines and errors == [
        (f"line{n_lines + 1}", f"{ann}:{n_lines + 1}: invalid UTF-8")
    ]


def test_cli_score_refuses_empty_input_and_missing_paths(tmp_path, capsys):
    # an empty MMIU predictions file printed an empty report and exited 0
    empty = tmp_path / "pred.jsonl"
    empty.write_text("")
    assert main(["eval", "score", "mmiu", str(empty)]) == 1
    assert capsys.readouterr().err.strip() == f"error: {empty}: no scorable record (no records)"
    # an MM-NIAH directory without result files printed nothing and exited 0
    (tmp_path / "results").mkdir()
    assert main(["eval", "score", "mmniah", str(tmp_path / "results")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {tmp_path / 'results'}: no result files") and "\n" not in err
    # a path that does not exist was reported as a badly named result file
    missing = tmp_path / "nothere.jsonl"
    assert main(["eval", "score", "mmniah", str(missing)]) == 1
    assert capsys.readouterr().err.strip() == f"error: {missing}: no such file or directory"


def test_cli_run_against_a_closed_port_fails_with_one_line(mini_mmiu, tmp_path, capsys):
    # every request refused once ended in 'wrote ...' and exit 0, nothing on stderr
    import socket

    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "out"
    args = ["eval", "run", "--model", f"openai:http://127.0.0.1:{port}#m", "--bench", "mmiu",
            "--data", str(mini_mmiu), "-o", str(out), "--no-progress", "--limit", "2", "--retries", "0"]  # fmt: skip
    assert main(args) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: openai:http://127.0.0.1:{port}#m: all 2 requests failed (model error: ")
    assert "Connection refused" in err and "\n" not in err
    scores = json.loads((out / "scores.json").read_text())  # the per-sample errors are still recorded
    assert scores["errors"]["by_kind"] == {"model_error": 2} and len(_preds(out)) == 2


def _failing_judge(monkeypatch, fails) -> None:
    """The judge's endpoint client raises, as after all retries, for the prompts ``fails`` picks
    (``make_judge`` itself, which records why calls failed, stays the real one)."""
    from interleaf import endpoint

    def complete(self, messages, **params) -> str:
        if fails(messages[0]["content"][0]["text"]):
            raise endpoint.EndpointError("ConnectionRefusedError talking to http://127.0.0.1:9: refused")
        return "A"

    monkeypatch.setattr(endpoint.OpenAIClient, "complete", complete)


def test_cli_score_mmiu_says_when_judge_calls_failed(monkeypatch, capsys):
    # against a closed port every judge call failed and the command exited 0, nothing on stderr:
    # the failures showed only as 'judge_error N' in the report
    pred, spec = str(DATA / "mmiu" / "predictions.jsonl"), "openai:http://127.0.0.1:9#j"
    _failing_judge(monkeypatch, lambda prompt: True)
    assert main(["eval", "score", "mmiu", pred, "--judge", spec, "--json"]) == 1
    captured = capsys.readouterr()
    res = json.loads(captured.out)  # the report is still printed, then one line
    n = res["extraction_counts"]["judge_error"]
    assert n > 0 and "judge" not in res["extraction_counts"]
    assert captured.err == (
        f"error: {spec}: all {n} judge calls failed (judge error: ConnectionRefusedError talking to "
        "http://127.0.0.1:9: refused); those records are left out of the scores\n"
    )
    # some failed: the scores stand, with a one-line warning that counts them
    _failing_judge(monkeypatch, lambda prompt: len(prompt) % 2 == 1)
    assert main(["eval", "score", "mmiu", pred, "--judge", spec, "--json"]) == 0
    captured = capsys.readouterr()
    counts = json.loads(captured.out)["extraction_counts"]
    failed, asked = counts["judge_error"], counts["judge_error"] + counts["judge"]
    assert 0 < failed < asked
    assert captured.err == (
        f"warning: {spec}: {failed} of {asked} judge calls failed (judge error: ConnectionRefusedError "
        "talking to http://127.0.0.1:9: refused); those records are left out of the scores\n"
    )
    _failing_judge(monkeypatch, lambda prompt: False)
    assert main(["eval", "score", "mmiu", pred, "--judge", spec]) == 0
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("bad", ["data", "model"])
def test_cli_run_leaves_no_output_folder_for_bad_data_or_model(mini_mmiu, tmp_path, capsys, bad):
    # the -o folder was created before --data and --model were checked: an empty OUT was left
    data = str(tmp_path / "nonexist") if bad == "data" else str(mini_mmiu)
    model = str(tmp_path / "nomodel")
    out = tmp_path / "out"
    args = [
        "eval",
        "run",
        "--model",
        model,
        "--bench",
        "mmiu",
        "--data",
        data,
        "-o",
        str(out),
        "--no-progress",
    ]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {data if bad == 'data' else model}: ") and err.count("\n") == 1
    assert not out.exists()


def test_cli_score_mmniah_report_links_no_heatmaps_it_does_not_write(tmp_path, capsys, monkeypatch):
    # the printed report linked heatmaps/<task>.png, which only 'eval run' writes
    monkeypatch.chdir(tmp_path)
    assert main(["eval", "score", "mmniah", str(DATA / "mmniah" / "results")]) == 0
    out = capsys.readouterr().out
    assert "| **Overall** |" in out and "heatmaps" not in out and ".png" not in out
    assert not list(tmp_path.iterdir())
