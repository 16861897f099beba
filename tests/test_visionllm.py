"""VisionLLM v2's super link: routing tokens, query slots, LM loss, generation, checkpoints."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from interleaf.errors import CheckpointError, InputError
from interleaf.model.visionllm import (
    EMB_TOKENS,
    IGNORE_INDEX,
    ROUTE_TOKENS,
    add_super_link_tokens,
    init_visionllm,
    load_visionllm,
    route_phrase,
    save_visionllm,
)


@pytest.fixture(scope="module")
def mllm():
    model, tok = init_visionllm("tiny", detector=False, seed=0)
    return model, tok


def _ids(tok, text: str) -> torch.Tensor:
    return torch.tensor([tok.encode(text, add_special_tokens=False)])


def test_tokens_are_added_whole_and_query_ids_are_consecutive(mllm):
    model, tok = mllm
    link = model.link
    assert set(link.route_token_ids) == set(ROUTE_TOKENS)
    ids = tok.encode("cat[DET][EMB][EMB2][EMB3][EMB4]", add_special_tokens=False)
    assert ids[-5:] == [link.route_token_ids["det"], *range(link.emb_token_id, link.emb_token_id + 4)]
    assert tok.convert_ids_to_tokens(ids[-4:]) == EMB_TOKENS[:4]
    assert add_super_link_tokens(tok) == {
        "route_token_ids": link.route_token_ids,
        "emb_token_id": link.emb_token_id,
    }


def test_slots_take_the_query_tables_and_nothing_else_changes(mllm):
    model, tok = mllm
    ids = _ids(tok, "a cat[DET][EMB][EMB2][EMB3][EMB4], a pose[POSE][EMB][EMB2][EMB3][EMB4] draw"
               "[GEN]" + "[EMB]" * 64 + "!")  # fmt: skip
    got = model.embed(ids)
    plain = model.language_model.model.embed_tokens(ids)
    pos = {
        k: (ids[0] == i).nonzero().item()
        for k, i in model.link.route_token_ids.items()
        if (ids[0] == i).any()
    }
    expect = plain.clone()
    expect[0, pos["det"] + 1 : pos["det"] + 5] = model.emb_embeddings_det.weight
    expect[0, pos["pose"] + 1 : pos["pose"] + 5] = model.emb_embeddings_pose.weight
    expect[0, pos["gen"] + 1 : pos["gen"] + 65] = model.emb_embeddings_gen.weight
    assert torch.equal(got, expect)
    links = model.find_links(ids)[0]
    assert [(x.kind, x.position, x.num_queries) for x in links] == [
        ("det", pos["det"], 4), ("pose", pos["pose"], 4), ("gen", pos["gen"], 64)
    ]  # fmt: skip


def test_a_routing_token_without_its_slots_is_refused_with_its_position(mllm):
    model, tok = mllm
    ids = _ids(tok, "a cat[DET][EMB][EMB2] dog")
    with pytest.raises(InputError, match=r"row 0, routing token \[DET\] at position \d+ is not followed"):
        model.embed(ids)


def test_lm_loss_leaves_the_slots_out_and_trains_the_query_table(mllm):
    model, tok = mllm
    ids = _ids(tok, "find the cat: cat[DET][EMB][EMB2][EMB3][EMB4], dog[GRD][EMB][EMB2][EMB3][EMB4].")
    labels = ids.clone()
    labels[0, :4] = IGNORE_INDEX
    model.zero_grad()
    out = model(ids, labels=labels)
    slots = torch.zeros_like(ids, dtype=torch.bool)
    for link in out.links[0]:
        slots[0, link.slots] = True
    want = labels.masked_fill(slots, IGNORE_INDEX)
    ref = F.cross_entropy(out.logits[0, :-1].float(), want[0, 1:], ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(out.lm_loss, ref)
    assert labels[0, slots[0]].ne(IGNORE_INDEX).all()  # the caller's labels are not modified
    out.loss.backward()
    assert model.emb_embeddings_det.weight.grad.abs().sum() > 0  # later tokens see the slots
    assert (
        model.emb_embeddings_gen.weight.grad is None or model.emb_embeddings_gen.weight.grad.abs().sum() == 0
    )
    model.zero_grad()


def test_link_states_group_each_rows_routes(mllm):
    model, tok = mllm
    a = _ids(tok, "x[DET][EMB][EMB2][EMB3][EMB4] y[SEG][EMB][EMB2][EMB3][EMB4] z")
    b = _ids(tok, "q[GRD][EMB][EMB2][EMB3][EMB4] zz zz zz zz zz")
    width = max(a.shape[1], b.shape[1])
    ids = torch.cat([F.pad(a, (0, width - a.shape[1])), F.pad(b, (0, width - b.shape[1]))])
    hidden = torch.randn(2, width, model.config.llm.hidden_size)
    links = model.find_links(ids)
    queries, mask = model.link_states(hidden, links)
    assert queries.shape == (2, 2, 4, hidden.shape[-1]) and mask.tolist() == [[True, True], [True, False]]
    first = links[0][1]
    assert torch.equal(queries[0, 1], hidden[0, first.slots])
    assert torch.equal(queries[1, 1], torch.zeros_like(queries[1, 1]))


class _Forced:
    """A forward hook on lm_head that makes greedy decoding emit ``script`` (one id per step)."""

    def __init__(self, script: list[int]) -> None:
        self.script, self.step = script, 0

    def __call__(self, module, args, logits):
        logits = logits.clone()
        if self.step < len(self.script):
            logits[:, -1, self.script[self.step]] = 1e4
        self.step += 1
        return logits


def test_generation_runs_each_route_s_slots_and_matches_a_full_forward(mllm, noise_image):
    from interleaf.processing.image import preprocess_image
    from interleaf.processing.prompt import build_prompt
    from interleaf.processing.templates import get_template

    model, tok = mllm
    pixels = preprocess_image(noise_image(3, 448, 448), max_num=1)
    prompt = build_prompt(
        get_template(model.config.template), "Find the cat.", [1], num_image_token=model.num_image_token
    )
    ids = _ids(tok, prompt)
    words = tok.encode(" the cat", add_special_tokens=False)
    det, gen = model.link.route_token_ids["det"], model.link.route_token_ids["gen"]
    eos = model.config.llm.eos_token_id
    script = [*words, det, words[-1], gen, eos]
    hook = model.language_model.lm_head.register_forward_hook(_Forced(script))
    try:
        out = model.generate(ids, pixels, max_new_tokens=10, eos_token_id=eos, tokenizer=tok)
    finally:
        hook.remove()
    assert out.token_ids == script and out.finish_reason == "stop"
    assert [r.kind for r in out.routes] == ["det", "gen"]
    assert out.routes[0].phrase == "the cat" and out.routes[0].token_index == len(words)
    assert out.routes[1].states.shape == (64, model.config.llm.hidden_size)  # the cache grew for 64 slots
    # teacher-forced: the whole answer with its slots in one forward
    full = script[:-1]
    full = (
        full[: len(words) + 1]
        + model.link.query_ids("det")
        + full[len(words) + 1 :]
        + model.link.query_ids("gen")
    )
    seq = torch.cat([ids, torch.tensor([full])], 1)
    ref = model(seq, pixel_values=pixels)
    start = ids.shape[1]
    det_at = start + len(words)
    torch.testing.assert_close(
        out.routes[0].states, ref.hidden[0, det_at + 1 : det_at + 5], atol=1e-4, rtol=1e-4
    )
    torch.testing.assert_close(out.routes[1].states, ref.hidden[0, -64:], atol=1e-4, rtol=1e-4)


def test_route_phrase():
    assert route_phrase("Sure. Found: <det>red square") == "red square"
    assert route_phrase(", blue circle") == "blue circle"
    assert route_phrase("the cat") == "the cat"
    assert route_phrase("I see two dogs. The st. bernard") == "The st. bernard"  # was "bernard"


def test_save_and_load_round_trip(tmp_path, mllm):
    model, tok = mllm
    out = save_visionllm(model, tok, tmp_path / "vllm")
    loaded, tok2 = load_visionllm(out)
    assert loaded.link == model.link
    for (k, v), (k2, v2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k
    assert tok2.encode("[DET][EMB4]", add_special_tokens=False) == tok.encode(
        "[DET][EMB4]", add_special_tokens=False
    )
    assert loaded.config.img_context_token_id == model.config.img_context_token_id is not None
    ids = torch.tensor([[model.config.img_context_token_id] * model.num_image_token + [5, 6]])
    pixels = torch.randn(1, 3, 448, 448)
    torch.testing.assert_close(loaded(ids, pixels).logits, model(ids, pixels).logits)


def test_load_names_missing_tensors(tmp_path, mllm):
    from safetensors.torch import load_file, save_file

    model, tok = mllm
    out = save_visionllm(model, tok, tmp_path / "vllm")
    weights = load_file(out / "model.safetensors")
    weights.pop("emb_embeddings_pose.weight")
    save_file(weights, str(out / "model.safetensors"))
    with pytest.raises(CheckpointError, match="missing tensors for the config: emb_embeddings_pose.weight"):
        load_visionllm(out)
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "config.json").write_text('{"model_type": "internvl_chat"}')
    with pytest.raises(CheckpointError, match="not a VisionLLM v2 checkpoint"):
        load_visionllm(tmp_path / "plain")


def test_a_bfloat16_checkpoint_loads_in_bfloat16(tmp_path):
    """load_visionllm built the model in float32 and kept it so: a bf16 checkpoint took twice its
    memory (load_checkpoint keeps the stored dtype)."""
    model, tok = init_visionllm("tiny", seed=0)
    model = model.to(torch.bfloat16)
    loaded, _ = load_visionllm(save_visionllm(model, tok, tmp_path / "bf16"))
    assert loaded.dtype == torch.bfloat16
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    for (k, v), (k2, v2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k
    as_float, _ = load_visionllm(tmp_path / "bf16", dtype="float32")
    assert {p.dtype for p in as_float.parameters()} == {torch.float32}


def test_a_bfloat16_model_takes_float32_pixels_in_its_training_forward():
    """collate_detection's pixels are float32; a bf16 model's forward failed on them ('Input type
    (float) and bias type (c10::BFloat16) should be the same'), where detect() casts its own; and
    the detector's loss ("cdist" not implemented for 'BFloat16')."""
    model, tok = init_visionllm("tiny", seed=0)
    model = model.to(torch.bfloat16)
    model.config.force_image_size = 56
    ctx = [model.config.img_context_token_id] * model.num_image_token
    ids = torch.cat([torch.tensor([ctx]), _ids(tok, "cat[DET][EMB][EMB2][EMB3][EMB4]")], 1)
    target = {"class_labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}
    out = model(ids, torch.randn(1, 3, 56, 56), labels=ids, det_pixel_values=torch.randn(1, 3, 64, 64),
                det_targets=[target])  # fmt: skip
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)


def test_lm_loss_is_zero_not_nan_when_no_label_is_left(mllm):
    """Labels that are all ignored (or only on the slots, which are left out) gave a NaN LM loss,
    and NaN gradients everywhere once it was added to the detector's loss."""
    model, tok = mllm
    ids = _ids(tok, "cat[DET][EMB][EMB2][EMB3][EMB4]")
    only_slots = torch.full_like(ids, IGNORE_INDEX)
    only_slots[0, -4:] = ids[0, -4:]
    for labels in (torch.full_like(ids, IGNORE_INDEX), only_slots):
        model.zero_grad()
        out = model(ids, labels=labels)
        assert out.lm_loss.item() == 0.0
        out.loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    model.zero_grad()


def test_generate_refuses_a_negative_token_budget(mllm):
    """max_new_tokens -1 sized the cache below the prompt: 'IndexError: index_copy_(): index 204 is out
    of bounds' (also from interleaf visionllm detect --max-new-tokens -1)."""
    model, tok = mllm
    with pytest.raises(InputError, match="max_new_tokens: must be >= 0, got -1"):
        model.generate(_ids(tok, "hello"), max_new_tokens=-1)
    assert model.generate(_ids(tok, "hello"), max_new_tokens=0).token_ids == []


def test_load_names_a_tensor_whose_shape_the_config_does_not_take(tmp_path, mllm):
    """A config edited after saving (num_embs 4 -> 2) was 'RuntimeError: Error(s) in loading
    state_dict for VisionLLMv2Model:', naming neither the tensor nor the shapes."""
    import json

    model, tok = mllm
    out = save_visionllm(model, tok, tmp_path / "vllm")
    config = json.loads((out / "config.json").read_text())
    config["visionllmv2"]["num_embs"] = 2
    (out / "config.json").write_text(json.dumps(config))
    hidden = model.config.llm.hidden_size
    with pytest.raises(CheckpointError, match=rf"tensor emb_embeddings_det.weight has shape \[4, {hidden}\], "
                       rf"the config expects \[2, {hidden}\]"):  # fmt: skip
        load_visionllm(out)


def test_many_routes_grow_the_cache_and_keep_matching_a_full_forward(mllm):
    model, tok = mllm
    ids = _ids(tok, "count them")
    det, eos = model.link.route_token_ids["det"], model.config.llm.eos_token_id
    script = [det] * 7 + [eos]  # 7 x 5 tokens: more than the first cache holds for 8 new tokens
    hook = model.language_model.lm_head.register_forward_hook(_Forced(script))
    try:
        out = model.generate(ids, max_new_tokens=8, eos_token_id=eos)
    finally:
        hook.remove()
    assert out.token_ids == script and len(out.routes) == 7
    seq = torch.cat([ids, torch.tensor([[det, *model.link.query_ids("det")] * 7])], 1)
    ref = model(seq).hidden[0, -4:]
    torch.testing.assert_close(out.routes[-1].states, ref, atol=1e-4, rtol=1e-4)


def test_history_routes_get_their_slots_as_upstream_inserts_them(mllm):
    model, tok = mllm
    det, eos = model.link.route_token_ids["det"], model.config.llm.eos_token_id
    bare = _ids(tok, "earlier: red square[DET], blue square[GEN] now")
    full = _ids(
        tok, "earlier: red square[DET][EMB][EMB2][EMB3][EMB4], blue square[GEN]" + "[EMB]" * 64 + " now"
    )
    assert model.with_slots(bare[0].tolist()) == full[0].tolist()
    assert model.with_slots(full[0].tolist()) == full[0].tolist()
    outs = []
    for ids in (bare, full):
        hook = model.language_model.lm_head.register_forward_hook(_Forced([det, eos]))
        try:
            outs.append(model.generate(ids, max_new_tokens=4, eos_token_id=eos))
        finally:
            hook.remove()
    torch.testing.assert_close(outs[0].routes[0].states, outs[1].routes[0].states)
