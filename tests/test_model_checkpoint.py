"""Checkpoint layouts: lossless round trips, sharding, legacy names, tokenizer, CLI and bad input."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from interleaf.cli import main
from interleaf.errors import CheckpointError, ConfigError
from interleaf.model import (
    build_offline_tokenizer,
    init_model,
    load_checkpoint,
    load_tokenizer,
    save_checkpoint,
)
from interleaf.model.checkpoint import read_weights
from interleaf.model.tokenizer import INTERNVL_TOKENS


def _state(model):
    return {k: v for k, v in model.state_dict().items()}


def _assert_same_weights(a, b):
    sa, sb = _state(a), _state(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("preset", ["tiny", "tiny-internlm2", "tiny-phi3", "tiny-llama", "tiny-qwen3"])
def test_round_trip_both_layouts_is_lossless(preset, tmp_path):
    path = init_model(preset, tmp_path / "a", layout="internvl_chat", seed=3)
    model, tok = load_checkpoint(path)
    hf = save_checkpoint(model, tok, tmp_path / "hf", layout="hf")
    back = save_checkpoint(load_checkpoint(hf)[0], tok, tmp_path / "b", layout="internvl_chat")
    m_hf, tok_hf = load_checkpoint(hf)
    m_back, _ = load_checkpoint(back)
    _assert_same_weights(model, m_hf)
    _assert_same_weights(model, m_back)
    # the on-disk tensors of the original layout are identical after original -> hf -> original
    a, b = read_weights(path)[0], read_weights(back)[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert m_back.config.llm == model.config.llm and m_back.config.vision == model.config.vision
    assert m_hf.config.template == model.config.template and m_hf.config.llm.family == model.config.llm.family
    assert tok_hf.get_vocab() == tok.get_vocab()


def test_sharded_and_bin_checkpoints_load(tiny_ckpt, tmp_path):
    model, tok = load_checkpoint(tiny_ckpt)
    sharded = save_checkpoint(
        model, tok, tmp_path / "sharded", layout="internvl_chat", max_shard_bytes=1_000_000
    )
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    _assert_same_weights(model, load_checkpoint(sharded)[0])
    # pytorch_model.bin (torch.load with weights_only=True)
    binary = tmp_path / "bin"
    shutil.copytree(tiny_ckpt, binary)
    tensors = load_file(str(binary / "model.safetensors"))
    (binary / "model.safetensors").unlink()
    torch.save(tensors, binary / "pytorch_model.bin")
    _assert_same_weights(model, load_checkpoint(binary)[0])


def test_old_hf_weight_prefixes_load(tiny_ckpt_hf, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(tiny_ckpt_hf, old)
    tensors = load_file(str(old / "model.safetensors"))
    renamed = {}
    for k, v in tensors.items():
        if k.startswith("model.language_model."):
            k = "language_model.model." + k[len("model.language_model.") :]
        elif k.startswith("lm_head."):
            k = "language_model." + k
        elif k.startswith("model."):
            k = k[len("model.") :]
        renamed[k] = v
    assert any(k.startswith("vision_tower.") for k in renamed)
    save_file(renamed, str(old / "model.safetensors"))
    _assert_same_weights(load_checkpoint(tiny_ckpt_hf)[0], load_checkpoint(old)[0])


def test_dtype_conversion_on_load(tiny_ckpt):
    model, _ = load_checkpoint(tiny_ckpt, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


# ----------------------------------------------------------------------------- bad input
def test_not_a_checkpoint_directory(tmp_path):
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        load_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json: not valid JSON"):
        load_checkpoint(tmp_path)


def test_unknown_config_key_is_named(tiny_ckpt, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_ckpt, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["frobnicate_level"] = 3
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"config.json: unknown config key 'frobnicate_level'"):
        load_checkpoint(bad)


def test_wrong_field_type_and_unsupported_llm(tiny_ckpt, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_ckpt, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["llm_config"]["architectures"] = ["MistralForCausalLM"]
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="unsupported LLM architecture 'MistralForCausalLM'"):
        load_checkpoint(bad)
    cfg["llm_config"]["architectures"] = ["Qwen2ForCausalLM"]
    cfg["ps_version"] = "v3"
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="'ps_version'"):
        load_checkpoint(bad)


def test_missing_and_mismatched_tensors_are_named(tiny_ckpt, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_ckpt, bad)
    tensors = load_file(str(bad / "model.safetensors"))
    name = "language_model.model.layers.1.mlp.down_proj.weight"
    shape_bad = dict(tensors)
    shape_bad[name] = torch.zeros(3, 3)
    save_file(shape_bad, str(bad / "model.safetensors"))
    with pytest.raises(CheckpointError, match=rf"model.safetensors: tensor {name} has shape \[3, 3\]"):
        load_checkpoint(bad)
    missing = dict(tensors)
    del missing[name]
    save_file(missing, str(bad / "model.safetensors"))
    with pytest.raises(CheckpointError, match=f"missing tensors for the config: {name}"):
        load_checkpoint(bad)
    extra = dict(tensors)
    extra["language_model.model.layers.9.mlp.up_proj.weight"] = torch.zeros(1)
    save_file(extra, str(bad / "model.safetensors"))
    with pytest.raises(
        CheckpointError, match="tensors the config does not use: language_model.model.layers.9"
    ):
        load_checkpoint(bad)
    (bad / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="model.safetensors: cannot read weights"):
        load_checkpoint(bad)


def test_bad_weight_files_and_dtypes_are_checkpoint_errors(tiny_ckpt, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_ckpt, bad)
    index = bad / "model.safetensors.index.json"
    for weight_map in ([1, 2], {"a": 5}):  # AttributeError / TypeError before
        index.write_text(json.dumps({"weight_map": weight_map}))
        with pytest.raises(CheckpointError, match="model.safetensors.index.json: not a valid weight index"):
            load_checkpoint(bad)
    index.unlink()
    tensors = load_file(str(bad / "model.safetensors"))
    name = "language_model.model.layers.0.mlp.up_proj.weight"
    save_file({**tensors, name: tensors[name].to(torch.int32)}, str(bad / "model.safetensors"))
    with pytest.raises(CheckpointError, match=f"tensor {name} has dtype int32"):  # a torch RuntimeError
        load_checkpoint(bad)
    for dtype in (torch.int8, 5):
        with pytest.raises(ConfigError, match="dtype"):
            load_checkpoint(tiny_ckpt, dtype=dtype)
    (bad / "model.safetensors").unlink()
    (bad / "pytorch_model.bin").write_bytes(b"not a pickle")  # pickle.UnpicklingError before
    with pytest.raises(CheckpointError, match="pytorch_model.bin: cannot read weights"):
        load_checkpoint(bad)


def test_cli_init_model_and_info(tmp_path, capsys):
    out = tmp_path / "cli-ckpt"
    assert main(["init-model", "--preset", "tiny-internlm2", str(out), "--layout", "hf", "--seed", "1"]) == 0
    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "layout:       hf" in text and "internlm2" in text and "internlm2-chat" in text
    for part in ("vision", "projector", "llm", "total"):
        assert f"params {part}:" in text
    model, _ = load_checkpoint(out)
    total = sum(p.numel() for p in model.parameters())
    assert f"{total:,d}" in text
    assert "4 heads / 2 kv of 32, rope dynamic" in text
    assert main(["init-model", "--preset", "tiny-qwen3", str(tmp_path / "q3")]) == 0
    assert main(["info", str(tmp_path / "q3")]) == 0
    assert "qwen3 (128w x 2L, 4 heads / 2 kv of 64, q/k norm, rope default" in capsys.readouterr().out


def test_cli_errors_are_one_line(tmp_path, tiny_ckpt, capsys):
    assert main(["info", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a checkpoint directory" in err and "Traceback" not in err
    bad = tmp_path / "bad"
    shutil.copytree(tiny_ckpt, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["bogus_key"] = 1
    (bad / "config.json").write_text(json.dumps(cfg))
    assert main(["info", str(bad)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'bogus_key'" in err and "config.json" in err


# ----------------------------------------------------------------------------- tokenizer
def test_offline_tokenizer_is_deterministic_and_complete(tmp_path):
    a, b = build_offline_tokenizer(), build_offline_tokenizer()
    assert a.get_vocab() == b.get_vocab()
    assert 2000 <= len(a) <= 4096
    ids = a.convert_tokens_to_ids(INTERNVL_TOKENS)
    assert ids == list(range(ids[0], ids[0] + len(INTERNVL_TOKENS)))  # added in upstream order
    text = "Ünïcode 你好, numbers 12345 and symbols {}<>|~ \t\n"
    assert a.decode(a(text).input_ids) == text
    special = {t.content for t in a.added_tokens_decoder.values() if t.special}
    assert {"<|im_start|>", "<|im_end|>", "<|end|>", "<IMG_CONTEXT>", "</box>"} <= special
    assert a.decode(a("<img><IMG_CONTEXT></img>hi").input_ids, skip_special_tokens=True) == "hi"
    assert a.tokenize("<|im_start|>user\n<IMG_CONTEXT>")[:1] == ["<|im_start|>"]
    a.save_pretrained(tmp_path)
    loaded = load_tokenizer(tmp_path, "phi3-chat")
    assert loaded.get_vocab() == a.get_vocab()


def test_load_tokenizer_adds_missing_internvl_tokens(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    base = Tokenizer(models.WordLevel({"hello": 0, "world": 1, "<unk>": 2}, unk_token="<unk>"))
    base.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=base, unk_token="<unk>").save_pretrained(tmp_path)
    tok = load_tokenizer(tmp_path, "Hermes-2")
    ids = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>", *INTERNVL_TOKENS])
    assert ids[2:] == list(range(ids[2], ids[2] + len(INTERNVL_TOKENS)))
    assert "<|im_end|>" in {t.content for t in tok.added_tokens_decoder.values() if t.special}
    with pytest.raises(CheckpointError, match="no tokenizer.json"):
        load_tokenizer(tmp_path / "nowhere")


@pytest.mark.parametrize(
    ("text", "needle"), [('{"model_max_length": ', "not valid JSON"), ("[1, 2]", "JSON object")]
)
def test_broken_tokenizer_config_is_named_not_tokenizer_json(tiny_ckpt, tmp_path, text, needle):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_ckpt, bad)
    (bad / "tokenizer_config.json").write_text(text)
    with pytest.raises(CheckpointError, match=needle) as info:
        load_tokenizer(bad)
    assert str(info.value).startswith(f"{bad / 'tokenizer_config.json'}: ")  # was blamed on tokenizer.json


def test_sentencepiece_only_tokenizer_is_converted_offline(tmp_path):
    """A checkpoint that ships only tokenizer.model (InternLM2 style) loads without sentencepiece."""
    from transformers.convert_slow_tokenizer import import_protobuf

    proto = import_protobuf().ModelProto()

    def add(piece, score=0.0, kind=1):
        p = proto.pieces.add()
        p.piece, p.score, p.type = piece, score, kind

    add("<unk>", kind=2)
    add("<s>", kind=3)
    add("</s>", kind=3)
    for b in range(256):
        add(f"<0x{b:02X}>", kind=6)
    add("<|im_start|>", kind=4)
    add("<|im_end|>", kind=4)
    for i, w in enumerate(["▁", "h", "e", "l", "o", "w", "r", "d", "▁h", "ll", "▁he", "llo", "▁hello", "▁w", "or",
                           "▁wor", "ld", "▁world"]):  # fmt: skip
        add(w, -float(i))
    proto.trainer_spec.model_type = 2  # BPE
    proto.trainer_spec.byte_fallback = True
    proto.trainer_spec.unk_id, proto.trainer_spec.bos_id, proto.trainer_spec.eos_id = 0, 1, 2
    proto.normalizer_spec.add_dummy_prefix = True
    (tmp_path / "tokenizer.model").write_bytes(proto.SerializeToString())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True, "eos_token": "</s>"}))
    tok = load_tokenizer(tmp_path, "internlm2-chat")
    ids = tok("hello world").input_ids
    assert tok.convert_ids_to_tokens(ids) == ["<s>", "▁hello", "▁world"]
    ids = tok("<|im_start|>héllo<|im_end|>").input_ids
    assert tok.convert_ids_to_tokens(ids) == [
        "<s>",
        "<|im_start|>",
        "▁h",
        "<0xC3>",
        "<0xA9>",
        "llo",
        "<|im_end|>",
    ]
    assert tok.decode(ids, skip_special_tokens=True) == "héllo"
    internvl = tok.convert_tokens_to_ids(INTERNVL_TOKENS)
    assert internvl == list(range(len(proto.pieces), len(proto.pieces) + len(INTERNVL_TOKENS)))
    (tmp_path / "tokenizer.model").write_bytes(b"\xff\x00garbage")
    with pytest.raises(CheckpointError, match="tokenizer.model"):
        load_tokenizer(tmp_path)
