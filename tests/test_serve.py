"""``interleaf serve``: the real server on loopback, spoken to with the official ``openai`` client."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

import interleaf
from interleaf.serve.protocol import ServerOptions, place_images
from interleaf.serve.server import make_server


def data_url(img) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def chat(tiny_ckpt):
    return interleaf.load(tiny_ckpt)


@pytest.fixture(scope="module")
def server(chat):
    with make_server(chat, ServerOptions(model_name="tiny", max_tokens=8), port=0).start() as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=120)


def metrics(server) -> dict[str, int]:
    return dict(server.scheduler.metrics)


def test_greedy_reply_is_what_chat_answers(chat, client, noise_image):
    img = noise_image(0)
    messages = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(img)}},
        {"type": "text", "text": "What is in the image?"},
    ]}]  # fmt: skip
    out = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=12)
    assert out.choices[0].message.content == chat.chat("What is in the image?", images=img, max_new_tokens=12)
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].finish_reason == "length"  # random weights never stop on their own
    _, ids, _, _ = chat.prepare("What is in the image?", img)
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(ids), 12)
    assert out.usage.total_tokens == len(ids) + 12 and out.object == "chat.completion"


def test_stream_pieces_join_to_the_reply(client, noise_image):
    messages = [{"role": "user", "content": [
        {"type": "text", "text": "Describe "}, {"type": "image_url", "image_url": {"url": data_url(noise_image(1))}},
        {"type": "text", "text": " in detail."},
    ]}]  # fmt: skip
    full = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=20)
    chunks = list(client.chat.completions.create(
        model="tiny", messages=messages, temperature=0, max_tokens=20, stream=True,
        stream_options={"include_usage": True},
    ))  # fmt: skip
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content and text
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    assert len({c.id for c in chunks}) == 1


def test_history_system_message_and_image_placement(chat, client, noise_image):
    a, b = noise_image(2), noise_image(3, 300, 500)
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(a)}},
                                     {"type": "text", "text": "First?"}]},
        {"role": "assistant", "content": "A picture."},
        {"role": "user", "content": [{"type": "text", "text": "And <image> here?"},
                                     {"type": "image_url", "image_url": {"url": data_url(b)}}]},
    ]  # fmt: skip
    out = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=10)
    _, ids, px, _ = chat.prepare(
        "And <image> here?",
        [a, b],
        history=[("<image>\nFirst?", "A picture.")],
        system_message="You are terse.",
    )
    assert out.usage.prompt_tokens == len(ids)
    want = chat.generator.generate(__import__("torch").tensor([ids]), pixel_values=px,
                                   config=chat._config({"max_new_tokens": 10}))  # fmt: skip
    assert out.choices[0].message.content == chat.decode_reply(want.tokens[0])


def test_place_images():
    assert place_images([None, "Q"]) == "<image>\nQ"  # images first: upstream's prefix
    assert place_images([None, None, "Q"]) == "Image-1: <image>\nImage-2: <image>\nQ"
    assert place_images(["A ", None, " B ", None]) == "A <image> B <image>"  # interleaved: in place
    assert place_images([None, "x <image> y"]) == "x <image> y"  # explicit placeholders win
    assert place_images(["no images"]) == "no images"


def test_requests_join_a_running_batch_and_answer_as_alone(chat, server, client, noise_image):
    questions = ["One?", "Two, a longer question?", "Three", "Four four four?"]
    images = [noise_image(10 + k, 200 + 100 * k, 300) for k in range(4)]
    before = metrics(server)
    # a long reply to a longer prompt (two images) runs while the others arrive: they join its batch
    pair = [noise_image(20), noise_image(21)]
    warm: list[str] = []

    def ask(content: list, max_tokens: int) -> str:
        out = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": content}],
                                             temperature=0, max_tokens=max_tokens)  # fmt: skip
        return out.choices[0].message.content

    def image_parts(imgs: list) -> list:
        return [{"type": "image_url", "image_url": {"url": data_url(im)}} for im in imgs]

    first = threading.Thread(
        target=lambda: warm.append(ask(image_parts(pair) + [{"type": "text", "text": "Go on."}], 300))
    )
    first.start()
    while metrics(server)["batches"] == before["batches"]:
        time.sleep(0.005)
    with ThreadPoolExecutor(4) as pool:
        replies = list(
            pool.map(
                lambda k: ask(image_parts(images[k : k + 1]) + [{"type": "text", "text": questions[k]}], 6),
                range(4),
            )
        )
    first.join()
    after = metrics(server)
    assert after["requests"] - before["requests"] == 5
    assert after["batches"] - before["batches"] == 1  # one batch: the four joined the running one
    assert after["batch_rows"] - before["batch_rows"] == 5
    assert replies == [chat.chat(q, images=im, max_new_tokens=6) for q, im in zip(questions, images)]
    assert warm == [chat.chat("Go on.", images=pair, max_new_tokens=300)]


def test_an_image_request_joins_a_batch_a_text_request_started(chat, server, client, noise_image):
    # its prompt is longer than the batch's write slot: the slot skips ahead instead of the request waiting
    image = noise_image(30)
    content = [
        {"type": "image_url", "image_url": {"url": data_url(image)}},
        {"type": "text", "text": "What?"},
    ]
    client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": content}], max_tokens=5
    )
    before = metrics(server)  # the server has seen an image request: its batches leave room for one
    text_reply: list[str] = []
    first = threading.Thread(target=lambda: text_reply.append(client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Talk."}], temperature=0, max_tokens=200,
    ).choices[0].message.content))  # fmt: skip
    first.start()
    while metrics(server)["batches"] == before["batches"]:
        time.sleep(0.005)
    out = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": content}],
                                         temperature=0, max_tokens=5)  # fmt: skip
    first.join()
    after = metrics(server)
    assert (after["batches"] - before["batches"], after["batch_rows"] - before["batch_rows"]) == (1, 2)
    assert out.choices[0].message.content == chat.chat("What?", images=image, max_new_tokens=5)
    assert text_reply == [chat.chat("Talk.", max_new_tokens=200)]


def test_a_qwen3_checkpoint_answers_as_chat_does_inside_a_shared_batch(tmp_path_factory, noise_image):
    """InternVL3.5's LLM family (tiny-qwen3: per-head q/k norms, head_dim 64 != 128 / 4 heads): an image
    request joins the KV cache of a running text batch and both answer as ``chat`` does alone."""
    from interleaf.model import init_model

    chat = interleaf.load(init_model("tiny-qwen3", tmp_path_factory.mktemp("ckpt") / "qwen3", seed=0))
    image = noise_image(40)
    content = [
        {"type": "image_url", "image_url": {"url": data_url(image)}},
        {"type": "text", "text": "What?"},
    ]
    with make_server(chat, ServerOptions(model_name="q3", max_tokens=8), port=0).start() as srv:
        client = openai.OpenAI(base_url=srv.url, api_key="unused", max_retries=0, timeout=120)

        def ask(content, max_tokens: int) -> str:
            out = client.chat.completions.create(model="q3", messages=[{"role": "user", "content": content}],
                                                 temperature=0, max_tokens=max_tokens)  # fmt: skip
            return out.choices[0].message.content

        ask(content, 2)  # once an image request was seen, batches leave room for one to join
        before = metrics(srv)
        text: list[str] = []
        first = threading.Thread(target=lambda: text.append(ask("Talk.", 300)))
        first.start()
        while metrics(srv)["batches"] == before["batches"]:
            time.sleep(0.005)
        joined = ask(content, 5)
        first.join()
        after = metrics(srv)
    assert (after["batches"] - before["batches"], after["batch_rows"] - before["batch_rows"]) == (1, 2)
    assert joined == chat.chat("What?", images=image, max_new_tokens=5)
    assert text == [chat.chat("Talk.", max_new_tokens=300)]


def test_stop_strings_and_per_request_lengths(chat, client):
    messages = [{"role": "user", "content": "Tell me everything."}]
    full = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=30)
    text = full.choices[0].message.content
    words = text.split()
    stop = words[len(words) // 2]
    cut = client.chat.completions.create(
        model="tiny", messages=messages, temperature=0, max_tokens=30, stop=[stop]
    )
    assert cut.choices[0].message.content == text[: text.index(stop)].strip()
    assert cut.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=30,
                                              stop=stop, stream=True)  # fmt: skip
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == cut.choices[0].message.content
    short = client.chat.completions.create(
        model="tiny", messages=messages, temperature=0, max_completion_tokens=3
    )
    assert short.usage.completion_tokens == 3 and text.startswith(short.choices[0].message.content)
    default = client.chat.completions.create(model="tiny", messages=messages, temperature=0)
    assert default.usage.completion_tokens == 8  # the server's --max-tokens


def test_sampling_is_seeded_and_greedy_at_temperature_zero(client):
    messages = [{"role": "user", "content": "Pick a word."}]

    def ask(**kw):
        return (
            client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, **kw)
            .choices[0]
            .message.content
        )

    assert ask(temperature=0.9, seed=7, top_p=0.9) == ask(temperature=0.9, seed=7, top_p=0.9)
    assert len({ask(temperature=1.5, seed=s) for s in range(4)}) > 1
    assert ask(temperature=0) == ask(temperature=0, top_p=0.5)  # greedy ignores top_p


def test_a_seeded_request_samples_as_chat_does(chat, client):
    """A seeded request runs alone, but in a RowBatch of --max-batch-size rows its draws came from the
    seeded generator together with the idle rows', so its reply was not chat's with that seed."""
    messages = [{"role": "user", "content": "Pick a word."}]
    for seed, sampling in [(7, {"temperature": 0.9, "top_p": 0.9}), (3, {"temperature": 1.5, "top_k": 50})]:
        out = client.chat.completions.create(
            model="tiny", messages=messages, max_tokens=8, seed=seed, extra_body=sampling
        )
        # a request without top_k samples without it (OpenAI, vLLM); chat's default is generate's top-k 50
        want = chat.chat(
            "Pick a word.", do_sample=True, seed=seed, max_new_tokens=8, **{"top_k": 0, **sampling}
        )
        assert out.choices[0].message.content == want, seed


def test_a_vanishing_temperature_answers_greedily(client):
    """A temperature in (0, 2] so small that the logits divided by it overflow got a 500 (an inf/nan
    probability); it samples its limit, which is the greedy reply."""
    messages = [{"role": "user", "content": "Pick a word."}]
    greedy = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0)
    for temperature, seed in [(1e-40, None), (1e-300, 5)]:
        out = client.chat.completions.create(
            model="tiny", messages=messages, max_tokens=6, temperature=temperature, seed=seed
        )
        assert out.choices[0].message.content == greedy.choices[0].message.content


def test_models_health_metrics_and_errors(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    with urllib.request.urlopen(server.url.removesuffix("/v1") + "/health") as r:
        assert r.status == 200
    with urllib.request.urlopen(server.url.removesuffix("/v1") + "/metrics") as r:
        assert "interleaf_requests_total" in r.read().decode()
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="other", messages=[{"role": "user", "content": "hi"}])
    bad = [
        (dict(messages=[]), "messages must be a non-empty list"),
        (dict(messages=[{"role": "assistant", "content": "hi"}]), "must alternate"),
        (dict(messages=[{"role": "user", "content": "hi"}], n=2), "n must be 1"),
        (dict(messages=[{"role": "user", "content": "hi"}], temperature=3), "temperature must be"),
        (dict(messages=[{"role": "user", "content": "hi"}], logprobs=True), "logprobs is not supported"),
        (dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "/etc/passwd"}}]}]),
         "local media paths are refused"),
        (dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@"}}]}]),
         r"messages\[0\].content\[0\].image_url.url: bad base64"),
        (dict(messages=[{"role": "user", "content": "two <image> <image>"}]), "placeholder"),
        (dict(messages=[{"role": "user", "content": "hi"}], max_tokens=40000), "maximum context length"),
    ]  # fmt: skip
    for kwargs, words in bad:
        with pytest.raises(openai.BadRequestError, match=words):
            client.chat.completions.create(model="tiny", **kwargs)


def test_a_reply_ending_on_the_end_token_finishes_with_stop(tiny_ckpt, tmp_path):
    """finish_reason 'stop' when the model emits the template's end token (random weights never do: a
    checkpoint made to), the token counted in usage as generated but not in the text, streamed or not;
    'length' when max_tokens ends the reply first, even on the step the end token would come."""
    from test_generation_engine import _stopping_checkpoint

    _, chat = _stopping_checkpoint(tiny_ckpt, tmp_path / "stops", "hello")
    ids = __import__("torch").tensor([chat.prepare("hello")[1]])
    out = chat.generator.generate(ids, max_new_tokens=40, stop_token_ids=chat.stop_token_ids)
    assert out.finish_reasons == ["stop"]
    k = len(out.tokens[0]) + 1  # new tokens, the end token included
    messages = [{"role": "user", "content": "hello"}]
    with make_server(chat, ServerOptions(model_name="m", max_tokens=40), port=0).start() as srv:
        client = openai.OpenAI(base_url=srv.url, api_key="unused", max_retries=0)
        for max_tokens, reason, n in [(40, "stop", k), (k, "stop", k), (k - 1, "length", k - 1)]:
            full = client.chat.completions.create(
                model="m", messages=messages, temperature=0, max_tokens=max_tokens
            )
            chunks = list(client.chat.completions.create(
                model="m", messages=messages, temperature=0, max_tokens=max_tokens, stream=True,
                stream_options={"include_usage": True},
            ))  # fmt: skip
            assert full.choices[0].message.content == chat.chat("hello", max_new_tokens=max_tokens)
            assert (full.choices[0].finish_reason, full.usage.completion_tokens) == (reason, n)
            assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == (
                full.choices[0].message.content
            )
            assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == reason
            assert chunks[-1].usage.completion_tokens == n


def test_local_media_root_and_api_key(chat, tmp_path, noise_image):
    noise_image(5).save(tmp_path / "a.png")
    options = ServerOptions(
        model_name="m", max_tokens=4, allowed_local_media_path=str(tmp_path), api_key="sesame"
    )
    with make_server(chat, options, port=0).start() as srv:
        ok = openai.OpenAI(base_url=srv.url, api_key="sesame", max_retries=0)
        for url in (str(tmp_path / "a.png"), (tmp_path / "a.png").as_uri()):
            content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "Q"}]
            out = ok.chat.completions.create(
                model="m", messages=[{"role": "user", "content": content}], temperature=0
            )
            assert out.choices[0].message.content == chat.chat(
                "Q", images=tmp_path / "a.png", max_new_tokens=4
            )
        outside = [{"type": "image_url", "image_url": {"url": str(tmp_path.parent / "x.png")}}]
        with pytest.raises(openai.BadRequestError, match="outside --allowed-local-media-path"):
            ok.chat.completions.create(model="m", messages=[{"role": "user", "content": outside}])
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=srv.url, api_key="wrong", max_retries=0).models.list()


def test_cli_serves_until_interrupted(tiny_ckpt, tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "interleaf.cli", "serve", str(tiny_ckpt), "--port", "0", "--max-tokens", "3"],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        line = proc.stderr.readline()
        assert "serving 'tiny' at http://127.0.0.1:" in line, line
        url = line.split(" at ")[1].split()[0]
        body = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}).encode()
        req = urllib.request.Request(
            url + "/chat/completions", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=60) as r:
            assert json.load(r)["usage"]["completion_tokens"] == 3
        proc.send_signal(__import__("signal").SIGINT)
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
    bad = subprocess.run([sys.executable, "-m", "interleaf.cli", "serve", str(tiny_ckpt), "--max-batch-size", "0"],
                         capture_output=True, text=True)  # fmt: skip
    assert bad.returncode == 1 and bad.stderr.strip() == "error: --max-batch-size must be >= 1, got 0"


def test_a_video_is_sampled_as_chat_samples_it(chat, client, gray_video, tmp_path):
    path = tmp_path / "clip.mkv"
    gray_video(path, 30)
    url = "data:video/x-matroska;base64," + base64.b64encode(path.read_bytes()).decode()
    content = [{"type": "video_url", "video_url": {"url": url}}, {"type": "text", "text": "What happens?"}]
    out = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": content}],
                                         temperature=0, max_tokens=6, extra_body={"mm_processor_kwargs": {"num_frames": 4}})  # fmt: skip
    assert out.choices[0].message.content == chat.chat(
        "What happens?", video=path, num_segments=4, max_new_tokens=6
    )
    _, ids, _, _ = chat.prepare("What happens?", video=path, num_segments=4)
    assert out.usage.prompt_tokens == len(ids)
    bad = [
        ([{"type": "video_url", "video_url": {"url": url}}, {"type": "image_url", "image_url": {"url": url}}],
         "one video and then no images"),
        ([{"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA"}}],
         r"messages\[0\].content\[0\].video_url.url: "),
    ]  # fmt: skip
    for content, words in bad:
        with pytest.raises(openai.BadRequestError, match=words) as err:
            client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": content}])
        assert "interleaf-video-" not in str(err.value)  # the temporary file is not named


def test_joiners_are_checked_against_the_batch_as_earlier_joiners_left_it(chat):
    """Two queued requests that each fit the running batch, but not both at once: the second is checked
    after the first joined, so it joins once it fits (it was checked against the batch as it was before
    the first joined, taken, and then failed: 'cannot join now')."""
    from interleaf.serve.server import Job, Scheduler

    def job(question: str, max_tokens: int) -> Job:
        _, ids, px, _ = chat.prepare(question)
        return Job((ids, px), {"do_sample": False}, max_tokens, (), False)

    first = job("Hi.", 5)
    p0 = len(first.prepared[0])
    question = "Hi, and a few more words to make this prompt longer."
    longer = job(question, 2)
    room = len(longer.prepared[0]) - p0 + 5  # slots = p0 + 5 + room: the longer prompt fits alone
    # the second step's write slot is p0 + 1: this one ends exactly at the last slot
    filler = job("Hi.", p0 + 5 + room - (p0 + 1))
    scheduler = Scheduler(chat, max_batch_size=4, join_room=room)
    try:
        with scheduler._cv:  # queued without waking the worker: this thread runs the batch
            scheduler._jobs += [filler, longer]
        scheduler._generate([first])
    finally:
        scheduler.close()
    assert [j.events.get_nowait()[0] for j in (first, filler)] == ["done", "done"]
    assert longer.events.get_nowait()[:2] == ("done", chat.chat(question, max_new_tokens=2))
    assert scheduler.metrics["batches"] == 1 and scheduler.metrics["batch_rows"] == 3


def test_think_splitter_parts_join_to_the_whole_replys_split_at_every_cut():
    from interleaf.serve.protocol import ThinkSplitter, split_reasoning

    assert split_reasoning("<think>\nplan\n</think>\n\nB") == ("\nplan\n", "\n\nB")  # kept as generated
    assert split_reasoning("B") == (None, "B")
    assert split_reasoning("pre<think>r</think>post") == ("r", "prepost")
    assert split_reasoning("<think>cut short") == ("cut short", "")
    assert split_reasoning("<thi") == (None, "<thi")
    assert split_reasoning("<think></think>x</think>y<think>z") == ("", "x</think>y<think>z")  # one block
    for text in ("<think>\nplan\n</think>\n\nB", "a<b<think>r</think", "<<think>>x</think</think>y"):
        whole = split_reasoning(text)
        for i in range(len(text) + 1):
            for j in range(i, len(text) + 1):
                s = ThinkSplitter()
                parts = s.push(text[:i]) + s.push(text[i:j]) + s.push(text[j:]) + s.finish()
                joined = ["".join(t for f, t in parts if f == k) for k in ("reasoning_content", "content")]
                assert ((joined[0] if s.started else None), joined[1]) == whole, (text, i, j)


def _thinking_checkpoint(path):
    """A tiny checkpoint whose greedy reply to "Why?" begins ``<think>`` yes ``</think>`` no: random
    weights, with the rows of the embedding and of the output layer of its own first four greedy tokens
    swapped with those of the four wanted ones (the computation is the same, the token names differ).
    ``<think>``/``</think>`` are added tokens, as in Qwen3's tokenizer."""
    import torch

    from interleaf.generation.chat import ChatModel
    from interleaf.model import build_model, save_checkpoint
    from interleaf.model.presets import preset_config_for
    from interleaf.model.tokenizer import build_offline_tokenizer

    tok = build_offline_tokenizer()
    tok.add_tokens(["<think>", "</think>"])
    want = [tok.convert_tokens_to_ids(t) for t in ("<think>", "yes", "</think>", "no")]
    for seed in range(50):  # a seed whose first four greedy tokens can be renamed one to one
        model = build_model(preset_config_for("tiny", tok), seed=seed)
        chat = ChatModel(model, tok)
        prompt = chat.prepare("Why?")[1]
        got = chat.generator.generate(torch.tensor([prompt]), max_new_tokens=4, ignore_eos=True).tokens[0]
        if len(set(got)) == 4 and not set(got) & set(want) and not set(got + want) & set(prompt):
            break
    else:
        raise AssertionError("no seed found")
    lm = model.language_model
    with torch.no_grad():
        for table in (lm.model.embed_tokens.weight, lm.lm_head.weight):
            for a, b in zip(got, want):
                table[[a, b]] = table[[b, a]]
    return save_checkpoint(model, tok, path)


def test_reasoning_parser_puts_the_think_block_in_reasoning_content(tmp_path):
    chat = interleaf.load(_thinking_checkpoint(tmp_path / "thinking"))
    assert chat.chat("Why?", max_new_tokens=4) == "<think>yes</think>no"
    messages = [{"role": "user", "content": "Why?"}]
    options = ServerOptions(model_name="m", max_tokens=4, reasoning_parser="qwen3")
    with make_server(chat, options, port=0).start() as srv:
        client = openai.OpenAI(base_url=srv.url, api_key="unused", max_retries=0)
        full = client.chat.completions.create(model="m", messages=messages, temperature=0).choices[0]
        assert (full.message.reasoning_content, full.message.content) == ("yes", "no")
        chunks = list(
            client.chat.completions.create(model="m", messages=messages, temperature=0, stream=True)
        )
        deltas = [c.choices[0].delta for c in chunks if c.choices]
        assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == "yes"
        assert "".join(d.content or "" for d in deltas) == "no"
        # a reply cut inside its reasoning has no content
        cut = client.chat.completions.create(model="m", messages=messages, temperature=0, max_tokens=2)
        assert (cut.choices[0].message.reasoning_content, cut.choices[0].message.content) == ("yes", "")
    # without the parser the tags stay in the content
    with make_server(chat, ServerOptions(model_name="m", max_tokens=4), port=0).start() as srv:
        client = openai.OpenAI(base_url=srv.url, api_key="unused", max_retries=0)
        plain = client.chat.completions.create(model="m", messages=messages, temperature=0).choices[0].message
        assert plain.content == "<think>yes</think>no" and getattr(plain, "reasoning_content", None) is None


def test_a_yarn_model_serves_the_scaled_context(tmp_path):
    """With yarn the context is the original one times the factor (as vLLM derives max_model_len), not
    max_position_embeddings: a prompt past the latter is answered, one past the former refused."""
    from interleaf.model import init_model

    rope = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128}
    path = init_model("tiny-qwen3", tmp_path / "yarn", overrides={
        "llm.rope_scaling": rope, "llm.max_position_embeddings": 160})  # fmt: skip
    chat = interleaf.load(path)
    with make_server(chat, ServerOptions(model_name="m", max_tokens=4), port=0).start() as srv:
        client = openai.OpenAI(base_url=srv.url, api_key="unused", max_retries=0)
        assert srv.context_length() == 512
        long = " ".join(["word"] * 300)
        assert 160 < len(chat.prepare(long)[1]) < 500
        reply = client.chat.completions.create(model="m", messages=[{"role": "user", "content": long}],
                                               temperature=0)  # fmt: skip
        assert reply.choices[0].message.content == chat.chat(long, max_new_tokens=4)
        with pytest.raises(openai.BadRequestError, match="past the model.s context of 512"):
            client.chat.completions.create(model="m", messages=[{"role": "user", "content": long + long}])
