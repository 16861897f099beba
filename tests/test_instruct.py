"""Instruction data (MMInstruct): captions -> instructions through an OpenAI-compatible endpoint.

The generating LLM is a scripted endpoint speaking the real protocol over loopback HTTP
(tests/instruct_endpoint.py); captioning also runs against interleaf's own server and tiny model.
"""

from __future__ import annotations

import json
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from instruct_endpoint import ScriptedLLM, expected_items
from interleaf.cli import main
from interleaf.instruct.engine import GenerateConfig, build_prompt, generate, read_captions
from interleaf.instruct.seeds import BUILTIN_SUFFIXES, TYPES, SeedBank, seed_bank

CAPTIONS = [
    ("china", "china.jpg", "An ancient temple with tiled roofs stands among green trees under a pale sky."),
    ("flower", "flower.jpg", "A pink flower with yellow stamens blooms in front of dark leaves in sunlight."),
    ("square", "square.png", "A plain blue square drawing centred on a white canvas with thin borders."),
]


@pytest.fixture
def images(tmp_path: Path) -> Path:
    from sklearn.datasets import load_sample_images

    root = tmp_path / "images"
    root.mkdir()
    for src in load_sample_images().filenames:
        shutil.copy(src, root / Path(src).name)
    img = Image.new("RGB", (300, 200), "white")
    img.paste((20, 40, 200), (100, 50, 200, 150))
    img.save(root / "square.png")
    return root


def write_captions(path: Path, rows: list[dict] | list[str]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture
def captions(images: Path) -> Path:
    rows = [{"id": i, "image": f, "caption": c, "domain": "image_description"} for i, f, c in CAPTIONS]
    return write_captions(images / "captions.jsonl", rows)


@pytest.fixture
def llm(loopback_http):
    scripted = ScriptedLLM()
    with loopback_http(scripted.handler()) as url:
        scripted.spec = f"openai:{url}/v1#scripted"
        yield scripted


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_generate_writes_the_scripted_instructions_in_training_format(captions, llm, tmp_path):
    out = tmp_path / "out"
    stats = generate(captions, llm.spec, out, GenerateConfig(concurrency=4), progress=False)
    samples = lines(out / "instructions.jsonl")
    assert len(llm.requests) == 3 * 4 and stats["requests"]["asked"] == 12
    assert stats["instructions"]["by_type"] == {"judge": 12, "choice": 9, "long": 9, "short": 9}
    assert len(samples) == 39 and lines(out / "rejected.jsonl") == []
    by_id = {s["id"]: s for s in samples}
    for cid, image, caption in CAPTIONS:
        for type_ in TYPES:
            for n, (question, answer, options) in enumerate(expected_items(type_, caption), 1):
                s = by_id[f"{cid}/{type_}/{n}"]
                assert s["image"] == image and s["type"] == type_ and s["caption_id"] == cid
                human, gpt = s["conversations"]
                assert human["from"] == "human" and gpt == {"from": "gpt", "value": answer}
                assert human["value"].startswith(f"<image>\n{question}")
                kind = {
                    "judge": "judge",
                    "choice": "select",
                    "long": "longsentence",
                    "short": "shortsentence",
                }
                suffixes = BUILTIN_SUFFIXES[kind[type_]]["English"]
                if type_ == "choice":
                    want = "\n".join(f"{L}. {o}" for L, o in zip("ABCD", options))
                    assert human["value"].startswith(f"<image>\n{question}\n{want}\n")
                    assert human["value"].rsplit("\n", 1)[1] in [x.strip() for x in suffixes]
                else:
                    assert any(human["value"] == f"<image>\n{question}{x}" for x in suffixes)
    assert stats["answers"]["judge"] == {"No": 6, "Yes": 6}
    assert stats["answers"]["choice"] == {"A": 3, "B": 3, "C": 3}
    # every request carried the caption, the domain, and three of the domain's seed questions
    bank = SeedBank()
    for body in llm.requests:
        prompt = body["messages"][-1]["content"]
        assert body["messages"][0]["role"] == "system" and body["max_tokens"] == 1024
        assert "temperature" not in body  # the endpoint's default, as the official engine
        seeds = json.loads(prompt.split("Example questions: ", 1)[1].split("\n", 1)[0])
        assert len(seeds) == 2 and all(
            any(s in bank.templates("image_description", t, "en") for t in TYPES) for s in seeds
        )


def test_generated_instructions_train_as_they_are(captions, llm, tmp_path):
    """meta.json + instructions.jsonl are what ``interleaf train`` reads: every sample builds."""
    from interleaf.model.tokenizer import build_offline_tokenizer
    from interleaf.train.data import ConversationDataset, DataArgs, SkipLog

    out = tmp_path / "out"
    generate(captions, llm.spec, out, GenerateConfig(types=["choice", "short"]), progress=False)
    args = DataArgs(template="internvl2_5", num_image_token=4, image_size=56, max_seq_length=512)
    log = SkipLog()
    ds = ConversationDataset(out / "meta.json", build_offline_tokenizer(), args, log)
    assert len(ds) == 18
    built = [ds.get(i) for i in range(len(ds))]
    assert all(s is not None for s in built) and log.total == 0
    assert all(s.num_tiles and s.pixel_values.shape[-1] == 56 for s in built)


def test_rerun_asks_nothing_again_and_writes_the_same_files(captions, llm, tmp_path):
    out = tmp_path / "out"
    first = generate(captions, llm.spec, out, progress=False)
    before = (out / "instructions.jsonl").read_bytes()
    second = generate(captions, llm.spec, out, progress=False)
    assert len(llm.requests) == 12
    assert second["requests"] == {**first["requests"], "from_store": 12, "asked": 0}
    assert (out / "instructions.jsonl").read_bytes() == before
    # another seed picks other seed questions / suffixes: a different prompt is asked again
    generate(captions, llm.spec, out, GenerateConfig(seed=1), progress=False)
    assert len(llm.requests) > 12


def test_killed_run_resumes_without_losing_or_duplicating(captions, tmp_path, loopback_http):
    slow = ScriptedLLM(delay=0.3)
    with loopback_http(slow.handler()) as url:
        spec = f"openai:{url}/v1#scripted"
        out = tmp_path / "out"
        cmd = [sys.executable, "-m", "interleaf.cli", "instruct", "generate", str(captions), "--llm", spec,
               "-o", str(out), "--concurrency", "1", "--no-progress"]  # fmt: skip
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        db = out / "responses.sqlite"
        deadline = time.time() + 120
        stored = 0
        while time.time() < deadline and proc.poll() is None:
            if db.exists():
                try:
                    with sqlite3.connect(db) as con:
                        stored = con.execute("SELECT COUNT(*) FROM responses").fetchone()[0]
                except sqlite3.OperationalError:  # the file is there, its table not yet
                    stored = 0
                if stored >= 3:
                    break
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert 3 <= stored < 12 and not (out / "instructions.jsonl").exists()
        asked_before = len(slow.requests)
        stats = generate(captions, spec, out, progress=False)
        # the rerun asks only what was not stored (a request in flight at the kill is asked again)
        assert (
            stats["requests"]["from_store"] >= stored
            and stats["requests"]["asked"] == 12 - stats["requests"]["from_store"]
        )
        assert len(slow.requests) - asked_before == stats["requests"]["asked"]
    reference = tmp_path / "ref"
    with loopback_http(ScriptedLLM().handler()) as url2:
        generate(captions, f"openai:{url2}/v1#scripted", reference, progress=False)
    got, want = lines(out / "instructions.jsonl"), lines(reference / "instructions.jsonl")
    assert got == want and len({s["id"] for s in got}) == len(got) == 39


def test_bad_records_and_bad_replies_are_counted_and_kept_out(images, llm, tmp_path):
    (images / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    shutil.copy(images / "square.png", images / "square_copy.png")
    rows = [
        {"id": "good", "image": "china.jpg", "caption": CAPTIONS[0][2]},
        "{not json",
        {"id": "nocap", "image": "flower.jpg"},
        {"id": "noimg", "caption": "text"},
        {"id": "missing", "image": "nowhere.jpg", "caption": "text"},
        {"id": "corrupt", "image": "corrupt.png", "caption": "text"},
        {"id": "square", "image": "square.png", "caption": "A blue square GARBLE on white paper."},
        {"id": "copy", "image": "square_copy.png", "caption": "the same bytes as square.png"},
        {"id": "good", "image": "flower.jpg", "caption": "repeats an id"},
        {
            "id": "fail",
            "image": "flower.jpg",
            "caption": "A flower FAIL in the sun.",
            "domain": "image_style",
        },
        {"id": "dup", "image": "big.png", "caption": "A big DUPLICATE BROKEN scene of many things."},
        {"id": "noseed", "image": "flower2.png", "caption": "A flower.", "domain": "celebrity_recognition"},
    ]
    Image.new("RGB", (64, 64), "red").save(images / "big.png")
    Image.new("RGB", (64, 64), "green").save(images / "flower2.png")
    path = write_captions(images / "bad.jsonl", rows)
    out = tmp_path / "out"
    cfg = GenerateConfig(types=["judge", "short"], retries=0)
    stats = generate(path, llm.spec, out, cfg, progress=False)
    assert stats["captions"] == {
        "used": 5,
        "rejected": {
            "bad_record": 4,
            "missing_image": 1,
            "bad_image": 1,
            "duplicate_image": 1,
        },
    }
    assert stats["requests"]["failed"] == 2 and stats["requests"]["rejected"] == {
        "endpoint_error": 2,
        "unparsable": 2,
    }
    assert stats["requests"]["not_asked"] == {"no_seeds": 2} and stats["requests"]["total"] == 8
    # DUPLICATE: items 2-4 repeat item 1's question; BROKEN: item 2 unanswered, item 3 a placeholder
    assert stats["items"]["rejected"] == {"missing_answer": 2, "placeholder_left": 2, "duplicate_question": 1}
    rejected = lines(out / "rejected.jsonl")
    assert len(rejected) == 7 + 2 + 4 + 5
    details = {r["reason"]: r["detail"] for r in reversed(rejected)}  # the first of each reason
    assert details["bad_record"].startswith("bad.jsonl:2: not valid JSON")
    assert [r["detail"] for r in rejected if r["reason"] == "bad_record"][1:] == [
        "bad.jsonl:3: field 'caption' (a non-empty string) is missing",
        "bad.jsonl:4: field 'image' (a path) is missing",
        "bad.jsonl:9: id 'good' repeats an earlier record's",
    ]
    assert "nowhere.jpg" in details["missing_image"] and "corrupt.png" in details["bad_image"]
    assert "square.png" in details["duplicate_image"]
    assert "celebrity_recognition" in details["no_seeds"]
    assert "HTTP 500" in details["endpoint_error"]
    unparsable = next(r for r in rejected if r["reason"] == "unparsable")
    assert unparsable["caption_id"] == "square" and "cannot help" in unparsable["response"]
    kept = lines(out / "instructions.jsonl")
    assert {s["caption_id"] for s in kept} == {"good", "dup"}
    assert [s["id"] for s in kept if s["caption_id"] == "dup"] == ["dup/judge/1", "dup/short/1"]
    # the failed requests are asked again by a rerun; nothing else is
    asked = len(llm.requests)
    again = generate(path, llm.spec, out, cfg, progress=False)
    assert len(llm.requests) - asked == 2 and again["requests"]["from_store"] == 6


def test_cli_generate_and_its_errors(captions, llm, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["instruct", "generate", str(captions), "--llm", llm.spec, "-o", str(out), "--no-progress",
                 "--types", "judge", "--lang", "en"]) == 0  # fmt: skip
    assert capsys.readouterr().out.strip() == f"wrote 12 instructions (judge 12) to {out}/instructions.jsonl"
    assert main(["instruct", "generate", str(captions), "--llm", llm.spec, "-o", str(out), "--no-progress",
                 "--types", "short", "--json"]) == 0  # fmt: skip
    assert json.loads(capsys.readouterr().out)["instructions"]["by_type"] == {"short": 9}
    # nothing listens on port 9: one line naming the endpoint, exit 1, the outputs still written
    code = main(["instruct", "generate", str(captions), "--llm", "openai:http://127.0.0.1:9/v1#m", "-o",
                 str(tmp_path / "down"), "--no-progress", "--retries", "0", "--types", "short"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 1 and "\n" not in err
    assert err.startswith("error: openai:http://127.0.0.1:9/v1#m: all 3 requests failed (")
    assert len(lines(tmp_path / "down" / "rejected.jsonl")) == 3
    for argv, message in [
        (["--llm", "http://x"], "expected openai:URL#MODEL"),
        (["--llm", llm.spec, "--concurrency", "0"], "--concurrency must be >= 1"),
        (["--llm", llm.spec, "--near-duplicate", "1.5"], "--near-duplicate must be in (0, 1]"),
        (["--llm", llm.spec, "--seeds", str(tmp_path / "none.json")], "none.json: no seed files"),
    ]:
        assert main(["instruct", "generate", str(captions), "-o", str(tmp_path / "x"), *argv]) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and "\n" not in err
    assert (
        main(["instruct", "generate", str(tmp_path / "nope.jsonl"), "--llm", llm.spec, "-o", str(out)]) == 1
    )
    assert capsys.readouterr().err.strip() == f"error: captions file not found: {tmp_path / 'nope.jsonl'}"


def test_chinese_prompts_and_answers(captions, llm, tmp_path):
    out = tmp_path / "out"
    stats = generate(captions, llm.spec, out, GenerateConfig(types=["judge"], lang="zh"), progress=False)
    assert stats["answers"]["judge"] == {"否": 6, "是": 6}
    prompt = llm.requests[0]["messages"][-1]["content"]
    assert "描述：" in prompt and "判断题" in prompt
    sample = lines(out / "instructions.jsonl")[0]
    suffixes = BUILTIN_SUFFIXES["judge"]["Chinese"]
    assert any(sample["conversations"][0]["value"].endswith(s) for s in suffixes)


def test_official_seed_layout_and_suffix_file(captions, llm, tmp_path):
    """A folder in the official all_seed layout (numbered files, empty files) and an end_prompt.json."""
    seeds = tmp_path / "all_seed"
    seeds.mkdir()
    layout = {"judge": {"English": ["Is it <x>?"], "Chinese": ["是<x>吗？"]},
              "choice": {"English": ["Which one?"], "Chinese": ["哪个？"]},
              "sentence": {"English": ["What is it?", "Why?"], "Chinese": ["是什么？"]}}  # fmt: skip
    (seeds / "00099_my_domain.json").write_text(json.dumps(layout))
    (seeds / "00007_attribute_recognition.json").write_text("")
    suffixes = tmp_path / "end_prompt.json"
    suffixes.write_text(json.dumps({"shortsentence": {"English": [" Tell me briefly."]}}))
    bank = seed_bank(seeds, suffixes)
    assert bank.templates("my_domain", "long", "en") == ["What is it?", "Why?"]
    assert bank.templates("attribute_recognition", "judge", "en") == []
    assert bank.templates("image_style", "choice", "en")  # built-in domains stay
    rows = [{"id": i, "image": f, "caption": c, "domain": "my_domain"} for i, f, c in CAPTIONS]
    path = write_captions(captions.parent / "mine.jsonl", rows)
    out = tmp_path / "out"
    generate(path, llm.spec, out, GenerateConfig(types=["short"]), bank=bank, progress=False)
    prompt = llm.requests[0]["messages"][-1]["content"]
    assert (
        'Example questions: ["What is it?", "Why?"]' in prompt
        or 'Example questions: ["Why?", "What is it?"]' in prompt
    )
    assert all(
        s["conversations"][0]["value"].endswith(" Tell me briefly.")
        for s in lines(out / "instructions.jsonl")
    )
    bad = tmp_path / "bad_seeds"
    bad.mkdir()
    (bad / "00001_x.json").write_text(json.dumps({"judge": {"English": "not a list"}}))
    with pytest.raises(Exception, match=r"00001_x.json: 'judge.English' must be a list of strings"):
        seed_bank(bad)
    (bad / "00001_x.json").write_text("{oops")
    with pytest.raises(Exception, match=r"00001_x.json: not valid JSON"):
        seed_bank(bad)


def test_prompt_reads_as_the_recipe_says(images):
    caps, _ = read_captions(write_captions(images / "c.jsonl", [
        {"image": "china.jpg", "gpt4v_caption_interface": "A temple.\n\nTrees.", "bing_tag": "Summer Palace"},
        {"image_path": "flower.jpg", "caption": "A flower.", "prior": ""},
    ]))  # fmt: skip
    assert [c.id for c in caps] == ["c.jsonl:1", "c.jsonl:2"]
    assert caps[0].caption == "A temple.\nTrees." and caps[0].prior == "Summer Palace"
    assert caps[1].prior == "Empty" and caps[1].domain == "image_description"
    prompt = build_prompt(caps[0], "judge", ["Is it <x>?"], "en")
    assert "Prior knowledge about the image (Empty means none): Summer Palace" in prompt
    assert "4 yes/no questions" in prompt and "half of them Yes" in prompt
    assert "<Q4> question 4 </Q4> <C4> Yes, No </C4> <A4> Yes or No </A4>" in prompt
    assert '["Is it <x>?"]' in prompt and "about image description" in prompt


# ----------------------------------------------------------------------------------------------------
# captioning


def test_caption_a_folder_then_generate_from_it(images, llm, tmp_path):
    from interleaf.instruct.caption import caption_images

    (images / "captions.jsonl").unlink(missing_ok=True)
    (images / "notes.txt").write_text("not an image")
    big = Image.new("RGB", (1600, 900), (10, 200, 30))
    big.save(images / "big.png")
    out = tmp_path / "cap"
    stats = caption_images(images, llm.spec, out, domain="image_scene", progress=False)
    caps = {c["id"]: c for c in lines(out / "captions.jsonl")}
    assert set(caps) == {"big.png", "china.jpg", "flower.jpg", "square.png"} and stats["captions"] == 4
    # the VLM saw a JPEG thumbnail within 512 x 512, aspect kept, sent with detail: low
    assert caps["big.png"]["caption"].startswith("A picture of 512 by 288 pixels with mean colour")
    assert caps["big.png"]["domain"] == "image_scene" and caps["big.png"]["image"] == "../images/big.png"
    assert all(b["messages"][0]["content"][0]["image_url"]["detail"] == "low" for b in llm.requests)
    # captions.jsonl is generate's input as it stands (image paths relative to its folder)
    gen = generate(
        out / "captions.jsonl", llm.spec, tmp_path / "gen", GenerateConfig(types=["short"]), progress=False
    )
    assert gen["instructions"]["total"] == 12 and gen["captions"]["rejected"] == {}


def test_caption_records_ocr_short_captions_and_resume(images, llm, tmp_path, capsys):
    rows = [
        {
            "id": "a",
            "image": "china.jpg",
            "ocr": "WELCOME TO THE TEMPLE",
            "domain": "ocr",
            "bing_tag": "temple",
        },
        {"id": "b", "image": "flower.jpg"},
        {"id": "c", "image": "missing.jpg"},
        "[1, 2]",
    ]
    path = write_captions(images / "recs.jsonl", rows)
    out = tmp_path / "cap"
    argv = ["instruct", "caption", str(path), "--vlm", llm.spec, "-o", str(out), "--no-progress"]
    assert main([*argv, "--min-words", "71"]) == 0
    assert capsys.readouterr().out.strip() == f"wrote 1 captions to {out}/captions.jsonl (3 rejected)"
    [cap] = lines(out / "captions.jsonl")  # the OCR caption is longer than the scripted 70 words
    assert cap["id"] == "a" and "It reads WELCOME TO THE TEMPLE." in cap["caption"]
    assert cap["prior"] == "temple" and cap["domain"] == "ocr"
    reasons = sorted(r["reason"] for r in lines(out / "rejected.jsonl"))
    assert reasons == ["bad_record", "caption_too_short", "missing_image"]
    asked = len(llm.requests)
    assert main([*argv, "--min-words", "71", "--json"]) == 0  # a rerun asks nothing again
    stats = json.loads(capsys.readouterr().out)
    assert stats["captions"] == 1 and stats["requests"]["from_store"] == 2 and len(llm.requests) == asked
    assert main([*argv, "--json"]) == 0  # another minimum is another prompt ("at least 60 words")
    stats = json.loads(capsys.readouterr().out)
    assert stats["captions"] == 2 and stats["requests"]["asked"] == 2


def test_caption_through_interleaf_serve_is_what_the_model_says(images, tiny_ckpt, tmp_path):
    """Real components end to end: interleaf's server and tiny model caption the images; each caption
    is the model's own greedy reply to the thumbnail and prompt that were sent."""
    import base64
    import io

    import interleaf
    from interleaf.instruct.caption import PROMPT, caption_images, thumbnail_data_url
    from interleaf.serve.protocol import ServerOptions
    from interleaf.serve.server import make_server

    chat = interleaf.load(tiny_ckpt)
    (images / "captions.jsonl").unlink(missing_ok=True)
    out = tmp_path / "cap"
    with make_server(chat, ServerOptions(model_name="tiny", max_num=1), port=0).start() as server:
        spec = f"openai:{server.url}#tiny"
        stats = caption_images(images, spec, out, min_words=0, max_tokens=8, temperature=0, progress=False)
        assert stats["captions"] == 3 and stats["requests"]["failed"] == 0
        # the random model writes no tags: every generation reply is unparsable, and counted so
        gen = generate(out / "captions.jsonl", spec, tmp_path / "gen",
                       GenerateConfig(types=["short"], max_tokens=8, temperature=0), progress=False)  # fmt: skip
        assert gen["instructions"]["total"] == 0 and gen["requests"]["rejected"] == {"unparsable": 3}
    for cap in lines(out / "captions.jsonl"):
        url = thumbnail_data_url(str(images / cap["id"]))
        thumb = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
        want = chat.chat("<image>\n" + PROMPT["en"].format(n=0), images=[thumb], max_num=1, max_new_tokens=8)
        assert cap["caption"] == want.strip()


def test_records_files_that_once_ended_the_run(images):
    """One bad line is one bad record: a first record that is a list, bytes that are not UTF-8, a
    caption holding U+2028 (a line break to str.splitlines, not to JSONL), a byte order mark."""
    good = {"id": "ok", "image": "china.jpg", "caption": "A temple\u2028under trees."}
    path = images / "odd.jsonl"
    path.write_bytes(
        b"\xef\xbb\xbf[1, 2]\n"
        + b'{"id": "latin1", "image": "flower.jpg", "caption": "caf\xe9"}\n'
        + json.dumps(good, ensure_ascii=False).encode()
        + b"\n"
    )
    caps, rejected = read_captions(path)
    assert [(c.id, c.caption) for c in caps] == [("ok", "A temple\u2028under trees.")]
    assert [r.detail.split(" (")[0] for r in rejected] == [
        "odd.jsonl:1: expected an object, got list",
        "odd.jsonl:2: not UTF-8 text",
    ]
    # a JSON list's items are records as they stand: a string is not a record, whatever it holds
    listed = images / "listed.json"
    listed.write_text("\ufeff" + json.dumps([good, json.dumps(good), 3], indent=1))
    caps, rejected = read_captions(listed)
    assert [c.id for c in caps] == ["ok"]
    assert [r.detail for r in rejected] == [
        "listed.json:2: expected an object, got str",
        "listed.json:3: expected an object, got int",
    ]


def test_fields_of_the_wrong_type_are_bad_records(images, llm, tmp_path):
    """An id that is a list, a float or a bool, a domain that is not a string, a caption that is a
    number: each record is rejected with the field named (str() of them made ids like "['a']" and
    domains like "{'x': 1}"); a null id is no id."""
    Image.new("RGB", (40, 40), "red").save(images / "red.png")
    rows = [
        {"id": ["a"], "image": "china.jpg", "caption": "A temple."},
        {"id": 1.5, "image": "china.jpg", "caption": "A temple."},
        {"id": True, "image": "china.jpg", "caption": "A temple."},
        {"id": "d", "image": "china.jpg", "caption": "A temple.", "domain": {"x": 1}},
        {"id": "n", "image": "china.jpg", "caption": 42},
        {"id": "s", "image": 7, "caption": "A temple."},
        {"id": None, "image": "china.jpg", "caption": "A temple.", "domain": " image_scene "},
        {"id": 7, "image": "flower.jpg", "caption": "A flower."},
    ]
    caps, rejected = read_captions(write_captions(images / "typed.jsonl", rows))
    assert [(c.id, c.domain) for c in caps] == [("typed.jsonl:7", "image_scene"), ("7", "image_description")]
    assert [r.detail for r in rejected] == [
        "typed.jsonl:1: field 'id' must be a non-empty string or an integer, got list",
        "typed.jsonl:2: field 'id' must be a non-empty string or an integer, got float",
        "typed.jsonl:3: field 'id' must be a non-empty string or an integer, got bool",
        "typed.jsonl:4: field 'domain' must be a string, got dict",
        "typed.jsonl:5: field 'caption' must be a non-empty string, got int",
        "typed.jsonl:6: field 'image' must be a path, got int",
    ]
    assert {r.reason for r in rejected} == {"bad_record"}
    # captioning reads records with the same rules, and an id given twice is a bad record there too
    from interleaf.instruct.caption import caption_images

    recs = [
        {"id": "x", "image": "china.jpg"},
        {"id": "x", "image": "red.png"},
        {"id": {"k": 1}, "image": "flower.jpg"},
        {"id": "y", "image": "flower.jpg", "domain": 3},
    ]
    out = tmp_path / "cap"
    stats = caption_images(write_captions(images / "recs.jsonl", recs), llm.spec, out, progress=False)
    assert [c["id"] for c in lines(out / "captions.jsonl")] == ["x"] and stats["captions"] == 1
    assert [r["detail"] for r in lines(out / "rejected.jsonl")] == [
        "recs.jsonl:2: id 'x' repeats an earlier record's",
        "recs.jsonl:3: field 'id' must be a non-empty string or an integer, got dict",
        "recs.jsonl:4: field 'domain' must be a string, got int",
    ]


def test_a_type_given_twice_is_asked_once(captions, llm, tmp_path):
    """Twice the same type made two requests under one id: every sample id twice, and the second
    copy of each question rejected as a duplicate of the first."""
    out = tmp_path / "out"
    stats = generate(captions, llm.spec, out, GenerateConfig(types=["judge", "judge"]), progress=False)
    samples = lines(out / "instructions.jsonl")
    assert len(llm.requests) == 3 and stats["requests"]["total"] == 3 and stats["types"] == ["judge"]
    assert len(samples) == 12 and len({s["id"] for s in samples}) == 12
    assert lines(out / "rejected.jsonl") == []


def test_interrupted_requests_stop_and_what_arrived_is_kept(tmp_path):
    """Ctrl-C while asking: the requests not yet started are not sent (the pool sent every one of
    them before the run stopped), and every answer that arrived is in the store."""
    import signal as sig
    import threading

    from interleaf.instruct.engine import Task, ask_all
    from interleaf.store import ResponseStore

    calls = []
    lock = threading.Lock()

    class SlowClient:
        def complete(self, messages, **params):
            time.sleep(0.05)
            with lock:
                calls.append(messages[0]["content"])
            return "answer"

    def interrupt(*_):
        raise KeyboardInterrupt

    tasks = [Task(f"t{i}", [{"role": "user", "content": str(i)}], key=f"k{i}") for i in range(60)]
    old = sig.signal(sig.SIGALRM, interrupt)
    try:
        with ResponseStore(tmp_path / "r.sqlite") as store:
            sig.setitimer(sig.ITIMER_REAL, 0.3)
            with pytest.raises(KeyboardInterrupt):
                ask_all(SlowClient(), tasks, store, {}, concurrency=2, progress=False)
            stored = len(store)
    finally:
        sig.setitimer(sig.ITIMER_REAL, 0)
        sig.signal(sig.SIGALRM, old)
    assert 2 <= len(calls) <= 20 and stored == len(calls)


def test_caption_image_paths_through_a_symbolic_link(tmp_path, llm):
    """``set1`` is reached through the link ``link``, and a record's image is ``../shared/a.png``:
    the file is real/shared/a.png (the file system resolves the link before ``..``), not what
    os.path.abspath made of the text (tmp/shared/a.png, which is not there)."""
    from interleaf.instruct.caption import caption_images

    (tmp_path / "real" / "set1").mkdir(parents=True)
    (tmp_path / "real" / "shared").mkdir()
    Image.new("RGB", (40, 30), "red").save(tmp_path / "real" / "shared" / "a.png")
    (tmp_path / "link").symlink_to(tmp_path / "real" / "set1", target_is_directory=True)
    recs = write_captions(
        tmp_path / "real" / "set1" / "recs.jsonl", [{"id": "a", "image": "../shared/a.png"}]
    )
    out = tmp_path / "out"
    caption_images(tmp_path / "link" / "recs.jsonl", llm.spec, out, min_words=0, progress=False)
    assert recs.exists()
    [cap] = lines(out / "captions.jsonl")
    assert cap["image"] == "../real/shared/a.png" and (out / cap["image"]).is_file()
    gen = generate(out / "captions.jsonl", llm.spec, tmp_path / "gen", GenerateConfig(types=["short"]),
                   progress=False)  # fmt: skip
    assert gen["captions"] == {"used": 1, "rejected": {}}


def test_suffix_without_a_space_and_caption_counts_under_a_limit(captions, llm, tmp_path):
    suffixes = tmp_path / "end_prompt.json"
    suffixes.write_text(
        json.dumps({"shortsentence": {"English": ["Answer briefly."], "Chinese": ["请简答。"]}})
    )
    out = tmp_path / "out"
    generate(captions, llm.spec, out, GenerateConfig(types=["short"]), bank=seed_bank(None, suffixes),
             progress=False)  # fmt: skip
    assert all(
        s["conversations"][0]["value"].endswith("? Answer briefly.")
        for s in lines(out / "instructions.jsonl")
    )
    generate(captions, llm.spec, out, GenerateConfig(types=["short"], lang="zh"),
             bank=seed_bank(None, suffixes), progress=False)  # fmt: skip
    assert all(
        s["conversations"][0]["value"].endswith("吗？请简答。") for s in lines(out / "instructions.jsonl")
    )
    # captioning with --limit: the images counted are those read, each a caption or a rejection
    from interleaf.instruct.caption import caption_images

    stats = caption_images(captions, llm.spec, tmp_path / "cap", min_words=0, limit=1, progress=False)
    assert stats["images"] == 1 == stats["captions"] + sum(stats["rejected"].values())


def test_limit_stops_reading_and_fields_fall_back(images, llm, tmp_path):
    rows = [
        {
            "id": "a",
            "image": None,
            "image_path": "china.jpg",
            "caption": "A temple.",
            "prior": ["Summer", "Palace"],
        },
        {"id": "b", "image": "flower.jpg", "caption": "A flower.", "bing_tag": {"title": "Rose"}},
        {"id": "c", "image": "nowhere.jpg", "caption": "never read"},
    ]
    path = write_captions(images / "lim.jsonl", rows)
    stats = generate(
        path, llm.spec, tmp_path / "out", GenerateConfig(types=["short"], limit=2), progress=False
    )
    assert stats["captions"] == {"used": 2, "rejected": {}}  # the third record is not read at all
    prompts = [b["messages"][-1]["content"] for b in llm.requests]
    assert any('(Empty means none): ["Summer", "Palace"]' in p for p in prompts)
    assert any('(Empty means none): {"title": "Rose"}' in p for p in prompts)


def test_temperature_must_be_a_finite_number(captions, llm, tmp_path, capsys):
    for bad in ("nan", "inf", "-1"):
        argv = [
            "instruct",
            "generate",
            str(captions),
            "--llm",
            llm.spec,
            "-o",
            str(tmp_path),
            "--temperature",
            bad,
        ]
        assert main(argv) == 1
        assert (
            capsys.readouterr().err.strip() == f"error: --temperature must be a number >= 0, got {float(bad)}"
        )
    assert not llm.requests


def test_group_turns_makes_one_conversation_per_caption_and_type(captions, llm, tmp_path, capsys):
    from interleaf.model.tokenizer import build_offline_tokenizer
    from interleaf.train.data import ConversationDataset, DataArgs, SkipLog

    out = tmp_path / "out"
    argv = ["instruct", "generate", str(captions), "--llm", llm.spec, "-o", str(out), "--no-progress",
            "--types", "judge", "short", "--group-turns"]  # fmt: skip
    assert main(argv) == 0
    assert (
        capsys.readouterr()
        .out.strip()
        .endswith(f"(judge 12, short 9) in 6 conversations to {out}/instructions.jsonl")
    )
    samples = {s["id"]: s for s in lines(out / "instructions.jsonl")}
    assert sorted(samples) == sorted(f"{c}/{t}" for c, _, _ in CAPTIONS for t in ("judge", "short"))
    for cid, _, caption in CAPTIONS:
        conv = samples[f"{cid}/judge"]["conversations"]
        items = expected_items("judge", caption)
        assert [t["value"] for t in conv[1::2]] == [a for _, a, _ in items]
        assert conv[0]["value"].startswith(f"<image>\n{items[0][0]}")
        assert all(
            t["value"].startswith(q) and "<image>" not in t["value"]
            for t, (q, _, _) in zip(conv[2::2], items[1:])
        )
    log = SkipLog()
    args = DataArgs(template="internvl2_5", num_image_token=4, image_size=56, max_seq_length=1024)
    ds = ConversationDataset(out / "meta.json", build_offline_tokenizer(), args, log)
    assert len(ds) == 6 and all(ds.get(i) is not None for i in range(6)) and log.total == 0


def test_choice_without_a_suffix_ends_with_its_options(captions, llm, tmp_path):
    suffixes = tmp_path / "end_prompt.json"
    suffixes.write_text(json.dumps({"select": {"English": []}}))
    bank = seed_bank(suffixes=suffixes)
    generate(
        captions, llm.spec, tmp_path / "out", GenerateConfig(types=["choice"]), bank=bank, progress=False
    )
    for s in lines(tmp_path / "out" / "instructions.jsonl"):
        assert s["conversations"][0]["value"].split("\n")[-1].startswith("D. ")


def test_empty_replies_are_failures_asked_again(captions, tmp_path, loopback_http):
    """A reply with no text (a provider's filter, a cut-off) is a failed request, not an answer to keep."""

    class Empty(ScriptedLLM):
        def handler(self):
            base = super().handler()

            class H(base):
                def do_POST(self) -> None:
                    n = int(self.headers["Content-Length"])
                    body = json.loads(self.rfile.read(n))
                    data = json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": "  "},
                                                    "finish_reason": "length"}], "model": body["model"]}).encode()  # fmt: skip
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)

            return H

    with loopback_http(Empty().handler()) as url:
        spec = f"openai:{url}/v1#m"
        cfg = GenerateConfig(types=["short"], retries=0)
        with pytest.raises(Exception, match="all 3 requests failed \\(empty reply\\)"):
            generate(captions, spec, tmp_path / "out", cfg, progress=False)
    assert {r["reason"] for r in lines(tmp_path / "out" / "rejected.jsonl")} == {"endpoint_error"}
    with sqlite3.connect(tmp_path / "out" / "responses.sqlite") as db:
        assert db.execute("SELECT COUNT(*) FROM responses").fetchone()[0] == 0


def test_a_stored_empty_reply_is_asked_again(tmp_path):
    """A store written before empty replies failed may hold one: it is no answer, so it is asked again
    and the answer replaces it."""
    from interleaf.instruct.engine import Task, ask_all
    from interleaf.store import ResponseStore

    class Client:
        def complete(self, messages, **params):
            return "answer " + messages[0]["content"]

    tasks = [Task(f"t{i}", [{"role": "user", "content": str(i)}], key=f"k{i}") for i in range(3)]
    with ResponseStore(tmp_path / "r.sqlite") as store:
        store.put("k0", "t0", "")
        store.put("k1", "t1", " \n")
        store.put("k2", "t2", "kept")
        counts = ask_all(Client(), tasks, store, {}, concurrency=2, progress=False)
        assert dict(counts) == {"from_store": 1, "asked": 2}
        assert [t.response for t in tasks] == ["answer 0", "answer 1", "kept"]
        assert store.get_many(["k0", "k1", "k2"]) == {"k0": "answer 0", "k1": "answer 1", "k2": "kept"}
