"""Trainer: exact resume, LoRA merge, freeze flags and presets, config errors, the CLI."""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from interleaf.cli import main
from interleaf.errors import CheckpointError, ConfigError
from interleaf.train.config import build_config, load_config
from interleaf.train.lora import LLM_TARGETS, VIT_TARGETS, apply_lora, merge_lora
from interleaf.train.trainer import Trainer, train


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from interleaf.train.demo import init_demo_model

    d = tmp_path_factory.mktemp("tiny")
    init_demo_model(d, image_size=56, vit=(32, 1), llm=(64, 2))
    return d


@pytest.fixture(scope="module")
def meta(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    rows = []
    for i in range(12):
        colour = ["red", "green", "blue"][i % 3]
        Image.new(
            "RGB", (40 + 8 * i, 40), {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}[colour]
        ).save(d / f"{i}.png")
        rows.append(
            {
                "id": i,
                "image": f"{i}.png",
                "conversations": [
                    {"from": "human", "value": "<image>\nColour?"},
                    {"from": "gpt", "value": colour},
                ],
            }
        )
    rows.append(
        {"id": "t", "conversations": [{"from": "human", "value": "Say hi"}, {"from": "gpt", "value": "hi"}]}
    )
    rows.append(
        {
            "id": "bad",
            "image": "missing.png",
            "conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}],
        }
    )
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "meta.json").write_text(json.dumps({"colours": {"root": ".", "annotation": "train.jsonl"}}))
    return d / "meta.json"


def _cfg(tiny_dir, meta, out, **kw):
    values = {
        "model_path": str(tiny_dir),
        "meta_path": str(meta),
        "output_dir": str(out),
        "max_steps": 6,
        "lr": 2e-3,
        "warmup_steps": 1,
        "packing": True,
        "max_packed_tokens": 160,
        "max_seq_length": 160,
        "max_dynamic_patch": 2,
        "grad_accum": 2,
        "log_steps": 1,
        **kw,
    }
    return build_config(values)


class Killed(Exception):
    pass


@pytest.mark.parametrize(
    "lora,dtype,workers",
    [(0, "fp32", 0), (4, "fp32", 0), (0, "bf16-master", 0), (4, "bf16-master", 0), (0, "fp32", 3)],
)
def test_resume_continues_the_same_loss_curve(tiny_dir, meta, tmp_path, monkeypatch, lora, dtype, workers):
    def _cfg(*args, **kw):  # noqa: F811 - the module's, in the precision and data workers under test
        return globals()["_cfg"](*args, dtype=dtype, num_workers=workers, **kw)

    straight = train(_cfg(tiny_dir, meta, tmp_path / "a", use_llm_lora=lora, save_steps=3), log=None)
    assert straight["skipped"] == {"missing_image": 1}

    real_step = Trainer.train_step

    def dying_step(self):
        if self.step == 3:
            raise Killed  # the process dies after checkpoint-3 was written
        return real_step(self)

    monkeypatch.setattr(Trainer, "train_step", dying_step)
    with pytest.raises(Killed):
        train(_cfg(tiny_dir, meta, tmp_path / "b", use_llm_lora=lora, save_steps=3), log=None)
    monkeypatch.setattr(Trainer, "train_step", real_step)
    assert (tmp_path / "b" / "checkpoint-3" / "train_state.pt").exists()
    assert not list((tmp_path / "b").glob(".tmp-*"))
    resumed = train(_cfg(tiny_dir, meta, tmp_path / "b", use_llm_lora=lora, save_steps=3), log=None)
    a = [loss for _, loss in straight["losses"]]
    b = [loss for _, loss in resumed["losses"]]
    assert len(a) == len(b) == 6
    assert a[0] > a[-1]  # it learns
    for x, y in zip(a, b):
        assert abs(x - y) < 1e-6
    log = [json.loads(ln) for ln in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]
    # the skip log of the killed + resumed run is the uninterrupted run's: nothing written twice
    skips = [(tmp_path / d / "skipped.rank0.jsonl").read_text() for d in "ab"]
    assert skips[0] == skips[1] and skips[0].count("\n") == 1


def test_lora_merge_matches_unmerged(tiny_dir):
    from interleaf.model.checkpoint import load_checkpoint

    model, _ = load_checkpoint(tiny_dir)
    model = model.float()
    wrapped = apply_lora(model.language_model, LLM_TARGETS, r=4, dropout=0.05)
    wrapped += apply_lora(model.vision_model, VIT_TARGETS, r=2, dropout=0.05)
    assert any(n.endswith("q_proj") for n in wrapped) and any(n.endswith("attn.qkv") for n in wrapped)
    gen = torch.Generator().manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    model.eval()
    ids = torch.randint(0, 100, (1, 20))
    ids[0, 3:7] = model.config.img_context_token_id
    pv = torch.randn(1, 3, 56, 56, generator=gen)
    with torch.no_grad():
        before = model(input_ids=ids, pixel_values=pv).logits
        assert merge_lora(model) == len(wrapped)
        after = model(input_ids=ids, pixel_values=pv).logits
    assert not any("lora" in n for n, _ in model.named_parameters())
    torch.testing.assert_close(before, after, atol=1e-5, rtol=1e-5)


def test_lora_training_saves_merged_checkpoint(tiny_dir, meta, tmp_path):
    from interleaf.model.checkpoint import load_checkpoint

    trainer = Trainer(
        _cfg(tiny_dir, meta, tmp_path, use_llm_lora=4, freeze_vit=True, freeze_mlp=True, max_steps=2),
        log=None,
    ).setup()
    base = {n: p.detach().clone() for n, p in trainer.raw_model.named_parameters() if "lora" not in n}
    trainer.train()
    for n, p in trainer.raw_model.named_parameters():
        if "lora" not in n:
            assert torch.equal(p, base[n]), n  # LoRA trains only the adapters
    trainer.raw_model.eval()
    ids = torch.randint(0, 100, (1, 12))
    with torch.no_grad():
        live = trainer.raw_model(input_ids=ids).logits
        saved, _ = load_checkpoint(tmp_path / "checkpoint-2")
        merged = saved.float()(input_ids=ids).logits
    torch.testing.assert_close(live, merged, atol=1e-5, rtol=1e-5)


def test_qwen3_preset_trains_packed_and_its_lora_checkpoint_reloads(meta, tmp_path):
    """InternVL3.5's LLM family from model_preset tiny-qwen3 (per-head q/k RMSNorm, head_dim 64 != 128 / 4
    heads), packed (variable-length attention): it learns, its q/k norms train, the checkpoint reloads as
    the live model; a LoRA run's merged checkpoint computes what its live adapters did."""
    from interleaf.model.checkpoint import load_checkpoint

    def run(out, **kw):
        cfg = build_config({"meta_path": str(meta), "output_dir": str(tmp_path / out), "max_steps": 4,
                            "lr": 2e-3, "warmup_steps": 1, "packing": True, "max_packed_tokens": 700,
                            "max_seq_length": 700, "max_dynamic_patch": 1, **kw})  # fmt: skip
        trainer = Trainer(cfg, log=None).setup()
        start = {n: p.detach().clone() for n, p in trainer.raw_model.named_parameters()}
        result = trainer.train()
        return trainer.raw_model.eval(), start, result

    ids = torch.randint(0, 100, (1, 12), generator=torch.Generator().manual_seed(0))
    for lora in (0, 4):
        init = {"model_path": str(tmp_path / "lora0" / "init")} if lora else {"model_preset": "tiny-qwen3"}
        model, start, result = run(f"lora{lora}", use_llm_lora=lora, **init)
        losses = [loss for _, loss in result["losses"]]
        assert len(losses) == 4 and losses[-1] < losses[0]
        norms = [n for n in start if n.endswith(("self_attn.q_norm.weight", "self_attn.k_norm.weight"))]
        assert len(norms) == 2 * model.config.llm.num_hidden_layers
        assert all(torch.equal(start[n], dict(model.named_parameters())[n]) == bool(lora) for n in norms)
        with torch.no_grad():
            saved, _ = load_checkpoint(result["checkpoint"])
            torch.testing.assert_close(saved(input_ids=ids).logits, model(input_ids=ids).logits)


def test_stage1_preset_trains_only_the_projector(tiny_dir, meta, tmp_path):
    trainer = Trainer(_cfg(tiny_dir, meta, tmp_path, stage="stage1", max_steps=2), log=None).setup()
    assert trainer.cfg.freeze_vit and trainer.cfg.freeze_llm and not trainer.cfg.freeze_mlp
    before = {n: p.detach().clone() for n, p in trainer.raw_model.named_parameters()}
    trainer.train()
    for n, p in trainer.raw_model.named_parameters():
        changed = not torch.equal(p, before[n])
        assert changed == n.startswith("mlp1."), n


def test_separate_learning_rates_per_part(tiny_dir, meta, tmp_path):
    trainer = Trainer(
        _cfg(tiny_dir, meta, tmp_path, vision_lr=1e-5, mlp_lr=1e-3, llm_lr=2e-4), log=None
    ).setup()
    base = {g["name"]: g["initial_lr"] for g in trainer.optimizer.param_groups}
    assert base["vision"] == 1e-5 and base["mlp"] == 1e-3 and base["llm"] == 2e-4
    assert base["llm_no_decay"] == 2e-4
    assert all(g["weight_decay"] == 0 for g in trainer.optimizer.param_groups if "no_decay" in g["name"])


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="unknown config key 'learning_rate'"):
        build_config({"model_preset": "tiny", "meta_path": "m.json", "learning_rate": 1.0})
    with pytest.raises(ConfigError, match="config key 'max_steps'"):
        build_config({"model_preset": "tiny", "meta_path": "m.json", "max_steps": "many"})
    with pytest.raises(ConfigError, match="config key 'freeze_llm'"):
        build_config({"model_preset": "tiny", "meta_path": "m.json", "freeze_llm": "yes"})
    with pytest.raises(ConfigError, match="config key 'loss_reduction'"):
        build_config({"model_preset": "tiny", "meta_path": "m.json", "loss_reduction": "mean"})
    with pytest.raises(ConfigError, match="'stage'"):
        build_config({"model_preset": "tiny", "meta_path": "m.json", "stage": "stage9"})
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text("model_preset: tiny\nmeta_path: m.json\nlr: 1e-4\nstage: stage1\n")
    cfg = load_config(cfg_path, ["freeze_llm=false", "max_steps=7"])
    assert cfg.lr == 1e-4 and cfg.freeze_vit and not cfg.freeze_llm and cfg.max_steps == 7
    with pytest.raises(ConfigError, match="unknown config key 'bogus'"):
        load_config(cfg_path, ["bogus=1"])


@pytest.mark.parametrize(
    "key,value,message",
    [("use_llm_lora", -1, "must be >= 0"), ("lr", -1e-4, "must be >= 0"), ("lr", "nan", "must be >= 0"),
     ("lora_dropout", 2, r"must be in \[0, 1\)"), ("adam_beta1", 5, r"must be in \[0, 1\)"),
     ("trainable_patterns", ["mlp1.("], "is not a regex"),
     # nonsense schedule / optimiser / data-loading values that were accepted silently
     ("warmup_ratio", 1.5, r"must be in \[0, 1\]"), ("warmup_ratio", -0.1, r"must be in \[0, 1\]"),
     ("min_lr_ratio", 2, r"must be in \[0, 1\]"), ("warmup_steps", -5, "must be >= 0"),
     ("weight_decay", -0.01, "must be >= 0"), ("pack_lookahead", -1, "must be >= 0"),
     ("num_workers", -2, "-1 for automatic"), ("max_packed_images", 0, "must be positive")],
)  # fmt: skip
def test_out_of_range_values_are_refused_naming_the_key(key, value, message):
    # before: a torch RuntimeError / ValueError / re.error mid-setup, or (lr) a silently diverging run
    with pytest.raises(ConfigError, match=f"config key '{key}': .*{message}"):
        build_config({"model_preset": "tiny", "meta_path": "m.json", key: value})


def test_values_that_mean_off_or_auto_stay_accepted():
    cfg = build_config(
        {"model_preset": "tiny", "meta_path": "m.json", "num_workers": -1, "save_total_limit": 0,
         "max_grad_norm": 0, "warmup_ratio": 0, "warmup_steps": 0, "min_lr_ratio": 1, "pack_lookahead": 0}
    )  # fmt: skip
    assert cfg.num_workers == -1 and cfg.save_total_limit == 0 and cfg.max_grad_norm == 0


def test_an_override_that_is_not_yaml_is_one_line():
    with pytest.raises(
        ConfigError, match="override 'lr': cannot parse value"
    ) as info:  # was the multi-line YAML error
        load_config(None, ["lr=[1,"])
    assert "\n" not in str(info.value)


def test_an_output_dir_that_is_a_file_is_a_config_error(tiny_dir, meta, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(f"model_path: {tiny_dir}\nmeta_path: {meta}\noutput_dir: {tmp_path / 'afile'}\n")
    assert main(["train", str(cfg_path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "config key 'output_dir': cannot create" in err and "afile" in err
    assert (tmp_path / "afile").read_text() == "x"


def test_cli_train_smoke_and_bad_config(tiny_dir, meta, tmp_path, capsys):
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(
        f"model_path: {tiny_dir}\nmeta_path: {meta}\noutput_dir: {tmp_path / 'out'}\nmax_steps: 2\n"
        "max_packed_tokens: 160\nmax_seq_length: 160\nmax_dynamic_patch: 1\n"
    )
    assert main(["train", str(cfg_path), "--set", "lr=1e-3", "--set", "save_layout=hf"]) == 0
    out = capsys.readouterr().out
    assert "checkpoint-2" in out
    cfg = json.loads((tmp_path / "out" / "checkpoint-2" / "config.json").read_text())
    assert cfg["model_type"] == "internvl"  # the -hf layout
    assert len((tmp_path / "out" / "log.jsonl").read_text().splitlines()) == 2
    assert main(["train", str(cfg_path), "--set", "warmup=3"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown config key 'warmup'" in err


@pytest.mark.parametrize(
    "mode,dtype", [("ddp", "fp32"), ("fsdp", "fp32"), ("ddp", "bf16-master"), ("fsdp", "bf16-master")]
)
def test_torchrun_two_processes_gloo(tiny_dir, meta, tmp_path, mode, dtype, torchrun):
    """The multi-process path: torchrun, 2 CPU ranks, gloo, DDP or FSDP2 (fully_shard)."""
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(
        f"model_path: {tiny_dir}\nmeta_path: {meta}\noutput_dir: {tmp_path / 'out'}\nmax_steps: 2\ndevice: cpu\n"
        "max_packed_tokens: 160\nmax_seq_length: 160\nmax_dynamic_patch: 1\nsave_steps: 1\n"
        f"distributed: {mode}\ndtype: {dtype}\nnum_workers: 1\n"
    )
    proc = torchrun("train", str(cfg_path))
    printed = [ln for ln in proc.stdout.splitlines() if ln == str(tmp_path / "out" / "checkpoint-2")]
    assert len(printed) == 1  # the path is printed by rank 0 only
    state = torch.load(tmp_path / "out" / "checkpoint-2" / "train_state.pt", weights_only=False)
    assert state["world_size"] == 2 and len(state["ranks"]) == 2
    # each rank read its own shard of the data
    assert (
        state["ranks"][0]["data"] != state["ranks"][1]["data"]
        or state["ranks"][0]["rng"] != state["ranks"][1]["rng"]
    )
    log = [json.loads(ln) for ln in (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2]
    from interleaf.model.checkpoint import load_checkpoint

    model, _ = load_checkpoint(tmp_path / "out" / "checkpoint-2")  # the gathered full weights load
    assert sum(p.numel() for p in model.parameters()) > 0


def test_pretraining_on_interleaved_documents(tiny_dir, tmp_path):
    """corpus_paths: OmniCorpus-layout documents and image-text pairs, next-token loss on the text."""
    Image.new("RGB", (60, 40), (0, 128, 255)).save(tmp_path / "p.png")
    docs = [
        {"texts": ["A blue picture follows.", None, "It was blue."], "images": [None, "p.png", None],
         "metadata": [None, {"url": "p.png"}, None], "general_metadata": {"id": f"d{i}"}}
        for i in range(4)
    ] + [{"image": "p.png", "text": "a blue rectangle"}, {"texts": ["broken"], "images": []}]  # fmt: skip
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    cfg = build_config(
        {
            "model_path": str(tiny_dir),
            "corpus_paths": [str(tmp_path / "docs.jsonl")],
            "output_dir": str(tmp_path / "out"),
            "max_steps": 3,
            "lr": 3e-3,
            "max_packed_tokens": 128,
            "max_seq_length": 128,
            "max_dynamic_patch": 2,
        }
    )
    result = train(cfg, log=None)
    assert result["skipped"] == {"bad_document": 1}
    assert result["losses"][-1][1] < result["losses"][0][1]


def test_grad_checkpointing_gives_the_same_gradients(tiny_dir, meta, tmp_path):
    grads = []
    for ckpt in (False, True):
        trainer = Trainer(
            _cfg(tiny_dir, meta, tmp_path / str(ckpt), grad_checkpointing=ckpt), log=None
        ).setup()
        from interleaf.train.packing import collate

        torch.manual_seed(0)
        batch = collate(trainer.batcher.next_batch(), trainer.pad_id)
        loss_sum, w_sum = trainer.step_module(batch)
        (loss_sum / w_sum).backward()
        grads.append(
            {n: p.grad.clone() for n, p in trainer.raw_model.named_parameters() if p.grad is not None}
        )
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-5)


def test_random_init_from_a_preset(meta, tmp_path):
    cfg = build_config(
        {"model_preset": "tiny", "meta_path": str(meta), "output_dir": str(tmp_path), "max_steps": 1,
         "max_dynamic_patch": 1, "max_packed_tokens": 1024, "max_seq_length": 1024}
    )  # fmt: skip
    result = train(cfg, log=None)
    assert (tmp_path / "init" / "config.json").exists() and (
        tmp_path / "checkpoint-1" / "config.json"
    ).exists()
    assert result["steps"] == 1


def test_unmerged_lora_checkpoint_loads_with_its_adapter(tiny_dir, meta, tmp_path):
    """merge_lora_on_save: false writes the base weights + adapter.safetensors + adapter_config.json;
    loading the checkpoint merges the adapter: the same logits as the checkpoint saved merged."""
    from safetensors.torch import load_file

    import interleaf
    from interleaf.model.checkpoint import load_checkpoint

    ckpts = {}
    for merge in (True, False):
        out = tmp_path / str(merge)
        train(_cfg(tiny_dir, meta, out, use_llm_lora=2, use_backbone_lora=2, merge_lora_on_save=merge,
                   max_steps=2), log=None)  # fmt: skip
        ckpts[merge] = out / "checkpoint-2"
    adapter = load_file(ckpts[False] / "adapter.safetensors")
    assert adapter and all("lora_" in k for k in adapter)
    assert any(k.startswith("vision_model.") for k in adapter)
    meta_json = json.loads((ckpts[False] / "adapter_config.json").read_text())
    assert meta_json["parts"]["llm"] == {"r": 2, "alpha": 4, "targets": list(LLM_TARGETS)}
    assert meta_json["parts"]["vision"]["r"] == 2
    assert not (ckpts[True] / "adapter.safetensors").exists()
    # adapter=False: the base weights (the LLM and ViT untouched; the projector trained in full)
    base, _ = load_checkpoint(ckpts[False], adapter=False)
    orig, _ = load_checkpoint(tiny_dir)
    for (n, p), (_, q) in zip(base.named_parameters(), orig.named_parameters()):
        assert torch.equal(p, q) != n.startswith("mlp1."), n
    ids = torch.randint(0, 100, (1, 24))
    ids[0, 3:7] = base.config.img_context_token_id
    pv = torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = {m: load_checkpoint(c)[0](input_ids=ids, pixel_values=pv).logits for m, c in ckpts.items()}
        plain = base(input_ids=ids, pixel_values=pv).logits
        chat = interleaf.load(str(ckpts[False])).model(input_ids=ids, pixel_values=pv).logits
    assert torch.equal(logits[False], logits[True])  # the same fp32 merge as on save
    assert torch.equal(chat, logits[True])
    assert not torch.allclose(plain, logits[True])  # the adapter trained something


def test_checkpoint_records_the_training_template_and_tiling(tiny_dir, meta, tmp_path):
    """template / tiling set for training are saved in config.json; interleaf.load prompts with them."""
    import interleaf
    from interleaf.processing.templates import get_template

    cfg = _cfg(tiny_dir, meta, tmp_path, template="internvl2_5", max_steps=1, max_dynamic_patch=3,
               min_dynamic_patch=2, use_thumbnail=False, dynamic_image_size=True)  # fmt: skip
    result = train(cfg, log=None)
    saved = json.loads((tmp_path / "checkpoint-1" / "config.json").read_text())
    assert (
        saved["template"] == "internvl2_5"
        and json.loads((tiny_dir / "config.json").read_text())["template"] == "Hermes-2"
    )
    assert (saved["max_dynamic_patch"], saved["min_dynamic_patch"], saved["use_thumbnail"]) == (3, 2, False)
    chat = interleaf.load(result["checkpoint"])
    assert chat.template.name == "internvl2_5"
    expect = get_template("internvl2_5", chat.config.system_message).chat_prompt("Hi?", None)
    assert chat.template.chat_prompt("Hi?", None) == expect
    assert chat._image_settings(None)["max_num"] == 3 and chat._image_settings(None)["use_thumbnail"] is False


def test_drop_path_rate_trains_with_stochastic_depth_and_is_saved(tiny_dir, meta, tmp_path):
    cfg = _cfg(tiny_dir, meta, tmp_path, max_steps=1, drop_path_rate=0.1)
    trainer = Trainer(cfg, log=None).setup()
    blocks = trainer.raw_model.vision_model.encoder.layers
    want = torch.linspace(0, 0.1, len(blocks)).tolist()  # upstream's per-block schedule
    assert [b.drop_path1.p for b in blocks] == pytest.approx(want) == [b.drop_path2.p for b in blocks]
    assert trainer.raw_model.config.vision.drop_path_rate == pytest.approx(0.1)
    trainer.train()
    saved = json.loads((tmp_path / "checkpoint-1" / "config.json").read_text())
    assert saved["vision_config"]["drop_path_rate"] == pytest.approx(0.1)
    with pytest.raises(ConfigError, match="drop_path_rate"):
        _cfg(tiny_dir, meta, tmp_path, drop_path_rate=1.5)


def test_a_fresh_run_starts_its_logs_and_checkpoints_fresh(tiny_dir, meta, tmp_path):
    """resume: false into a used output_dir: log.jsonl and the skip log are the new run's alone, and
    the earlier run's checkpoints are removed (a later resume must not pick them up)."""
    train(_cfg(tiny_dir, meta, tmp_path, max_steps=3, save_steps=1, save_total_limit=5), log=None)
    assert (tmp_path / "checkpoint-3").exists()
    train(_cfg(tiny_dir, meta, tmp_path, max_steps=2, resume=False), log=None)
    log = [json.loads(ln) for ln in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2]
    assert (tmp_path / "skipped.rank0.jsonl").read_text().count("\n") == 1
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2"]
    # resume: true with no checkpoint (a run killed before its first save) starts the log fresh too
    for p in tmp_path.glob("checkpoint-*"):
        shutil.rmtree(p)
    train(_cfg(tiny_dir, meta, tmp_path, max_steps=1), log=None)
    assert [json.loads(ln)["step"] for ln in (tmp_path / "log.jsonl").read_text().splitlines()] == [1]


def test_dummy_tile_gives_zero_vision_gradients_on_a_text_only_batch(tiny_dir, meta, tmp_path):
    """The FSDP dummy tile: a text-only micro-batch still gives the ViT and projector gradients (zero),
    and leaves the loss and every other gradient as they were."""
    from interleaf.train.packing import collate
    from interleaf.train.trainer import TrainStep

    trainer = Trainer(_cfg(tiny_dir, meta, tmp_path, packing=False, shuffle=False), log=None).setup()
    batch = None
    for _ in range(20):
        batch = collate(trainer.batcher.next_batch(), trainer.pad_id)
        if batch["pixel_values"] is None:
            break
    assert batch["pixel_values"] is None  # the text-only sample
    model = trainer.raw_model
    runs = []
    for dummy in (None, torch.zeros(1, 3, 56, 56)):
        model.zero_grad(set_to_none=True)
        loss_sum, _ = TrainStep(model, dummy_tile=dummy)(batch)
        loss_sum.backward()
        runs.append((loss_sum.item(), {n: p.grad for n, p in model.named_parameters()}))
    assert runs[0][0] == runs[1][0]
    for n, g in runs[1][1].items():
        if n.startswith(("vision_model.", "mlp1.")):
            assert runs[0][1][n] is None and g is not None and not g.any(), n
        else:
            assert (g is None) == (runs[0][1][n] is None) and (g is None or torch.equal(g, runs[0][1][n])), n


def test_the_loss_is_normalised_over_the_whole_step(tiny_dir, tmp_path):
    """sum(w * CE) / sum(w) over all micro-batches of a step: two packs of two samples (grad_accum 2)
    train exactly as one pack of the four, for every loss reduction."""
    words = "one two three four five six seven eight nine".split()
    rows = [
        {"id": i, "conversations": [{"from": "human", "value": f"Count to {k}"},
                                    {"from": "gpt", "value": " ".join(words[:k])}]}
        for i, k in enumerate([1, 6, 3, 8, 2, 7, 4, 5])
    ]  # fmt: skip
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "meta.json").write_text(json.dumps({"d": {"root": str(tmp_path), "annotation": "t.jsonl"}}))
    for reduction in ("square", "sample", "token"):
        losses = []
        for accum, budget in ((2, 100), (1, 200)):  # 42-49 tokens a sample: 2 or 4 per pack
            cfg = _cfg(tiny_dir, tmp_path / "meta.json", tmp_path / f"{reduction}{accum}", grad_accum=accum,
                       max_packed_tokens=budget, max_seq_length=100, pack_lookahead=1, shuffle=False,
                       loss_reduction=reduction, max_steps=2, lr=5e-3, warmup_steps=0)  # fmt: skip
            result = train(cfg, log=None)
            log = [
                json.loads(ln)
                for ln in (tmp_path / f"{reduction}{accum}" / "log.jsonl").read_text().splitlines()
            ]
            assert [r["samples"] for r in log] == [4, 4]
            losses.append([loss for _, loss in result["losses"]])
        assert losses[0] == pytest.approx(losses[1], rel=1e-5), reduction


def test_bf16_master_weights(tiny_dir, meta, tmp_path):
    """bf16-master: a bf16 model, fp32 masters in AdamW, the model = the rounded masters after each
    step, fp32 masters in the checkpoint; the loss curve follows fp32 training."""
    from interleaf.model.checkpoint import load_checkpoint

    curves = {}
    for dtype in ("fp32", "bf16-master"):
        trainer = Trainer(_cfg(tiny_dir, meta, tmp_path / dtype, dtype=dtype, max_steps=3), log=None).setup()
        model = trainer.raw_model
        masters = [p for g in trainer.optimizer.param_groups for p in g["params"]]
        assert {m.dtype for m in masters} == {torch.float32}
        if dtype == "bf16-master":
            assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
            assert all(b.dtype == torch.float32 for n, b in model.named_buffers() if "freq" in n)
            assert not any(m is p for m in masters for p in model.parameters())
        curves[dtype] = [trainer.train_step()["loss"] for _ in range(3)]
        if dtype == "bf16-master":
            for name, m in trainer.master.named_masters(model):
                assert torch.equal(model.get_parameter(name), m.to(torch.bfloat16)), name
            trainer.step = 3
            saved, _ = load_checkpoint(trainer.save())
            named = dict(trainer.master.named_masters(model))
            for name, p in saved.named_parameters():
                if name in named:
                    assert p.dtype == torch.float32 and torch.equal(p, named[name].cpu()), name
    for a, b in zip(curves["fp32"], curves["bf16-master"]):
        assert abs(a - b) < 0.05 * abs(a)


def test_compiled_layers_train_like_eager(tiny_dir, meta, tmp_path):
    """``compile: true`` (torch.compile per layer) gives the eager losses and gradients."""
    from interleaf.train.packing import collate

    grads, losses = [], []
    for compiled in (False, True):
        trainer = Trainer(_cfg(tiny_dir, meta, tmp_path / str(compiled), compile=compiled), log=None).setup()
        batch = collate(trainer.batcher.next_batch(), trainer.pad_id)
        loss_sum, w_sum = trainer.step_module(batch)
        (loss_sum / w_sum).backward()
        losses.append((loss_sum / w_sum).item())
        grads.append({n: p.grad for n, p in trainer.raw_model.named_parameters() if p.grad is not None})
    assert abs(losses[0] - losses[1]) < 1e-5
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-5, rtol=1e-4)


def test_data_workers_change_nothing(tiny_dir, meta, tmp_path):
    """Read-ahead data threads: the same losses, skips and log as loading in the training loop."""
    runs = [
        train(_cfg(tiny_dir, meta, tmp_path / str(w), num_workers=w, max_steps=4), log=None) for w in (0, 3)
    ]
    assert runs[0]["losses"] == runs[1]["losses"]
    assert runs[0]["skipped"] == runs[1]["skipped"] == {"missing_image": 1}
    skips = [(tmp_path / str(w) / "skipped.rank0.jsonl").read_text() for w in (0, 3)]
    assert skips[0] == skips[1] and skips[0].count("\n") == 1


def test_resume_writes_each_skip_once(tiny_dir, tmp_path, monkeypatch):
    """Skips met after the last checkpoint and before a kill are met again after resuming: the skip
    log and counts end as the uninterrupted run's, each bad sample once."""
    rows = []
    for i in range(18):
        Image.new("RGB", (40, 40), (255, 0, 0)).save(tmp_path / f"{i}.png")
        rows.append(
            {"id": i, "image": f"{i}.png" if i % 3 else "missing.png",
             "conversations": [{"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "red"}]}
        )  # fmt: skip
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "meta.json").write_text(json.dumps({"d": {"root": str(tmp_path), "annotation": "t.jsonl"}}))

    def cfg(out):
        return _cfg(tiny_dir, tmp_path / "meta.json", tmp_path / out, packing=False, grad_accum=1,
                    max_steps=8, save_steps=2)  # fmt: skip

    straight = train(cfg("a"), log=None)
    real_step = Trainer.train_step

    def dying_step(self):
        before = self.skip_log.total
        out = real_step(self)
        if self.step >= 4 and self.skip_log.total > before:
            raise Killed  # dies in a step after checkpoint-4 that met a bad sample
        return out

    monkeypatch.setattr(Trainer, "train_step", dying_step)
    with pytest.raises(Killed):
        train(cfg("b"), log=None)
    monkeypatch.setattr(Trainer, "train_step", real_step)
    killed = (tmp_path / "b" / "skipped.rank0.jsonl").read_text().count("\n")
    state = torch.load(tmp_path / "b" / "checkpoint-4" / "train_state.pt", weights_only=False)
    assert killed > sum(state["ranks"][0]["skips"].values())  # skips were written after the checkpoint
    resumed = train(cfg("b"), log=None)
    assert resumed["skipped"] == straight["skipped"] and straight["skipped"]["missing_image"] > killed - 1
    files = [(tmp_path / d / "skipped.rank0.jsonl").read_text() for d in "ab"]
    assert files[0] == files[1] and files[0].count("\n") == straight["skipped"]["missing_image"]


@contextlib.contextmanager
def _killed_while_removing(monkeypatch, name, files):
    """The run dies (Killed) part-way through ``shutil.rmtree`` of the folder ``name``, after removing
    ``files`` from it (a list, or a callable giving it at that moment); the context expects that."""
    real_rmtree = shutil.rmtree

    def dying_rmtree(path, *args, **kwargs):
        if Path(path).name == name:
            for f in files() if callable(files) else files:
                (Path(path) / f).unlink(missing_ok=True)
            raise Killed
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", dying_rmtree)
    with pytest.raises(Killed):
        yield
    monkeypatch.setattr(shutil, "rmtree", real_rmtree)


def test_a_kill_while_a_checkpoint_is_replaced_resumes_from_the_one_before(
    tiny_dir, meta, tmp_path, monkeypatch
):
    """A finished run started again re-saves its last checkpoint over the old folder: a kill part-way
    through removing it must not leave a folder that still looks complete (train_state.pt, no
    weights), which every later resume would pick and fail on."""

    def cfg():
        return _cfg(tiny_dir, meta, tmp_path, max_steps=2, save_steps=1)

    straight = train(cfg(), log=None)
    with _killed_while_removing(monkeypatch, "checkpoint-2", ["model.safetensors"]):
        train(cfg(), log=None)
    lines: list[str] = []
    resumed = train(cfg(), log=lines.append)
    assert any("resumed from" in ln and ln.split()[2].endswith("checkpoint-1") for ln in lines)
    assert resumed["losses"] == straight["losses"]
    assert [json.loads(ln)["step"] for ln in (tmp_path / "log.jsonl").read_text().splitlines()] == [1, 2]


def test_pruning_cleans_up_after_a_kill_part_way(tiny_dir, meta, tmp_path, monkeypatch):
    """A kill while save_total_limit removes an old checkpoint leaves part of its folder; the next
    save removes the rest, so no folder outlives the limit."""

    def cfg():
        return _cfg(tiny_dir, meta, tmp_path, max_steps=3, save_steps=1, save_total_limit=1)

    folder = tmp_path / "checkpoint-1"
    everything_but_config = lambda: [p.name for p in folder.iterdir() if p.name != "config.json"]  # noqa: E731
    with _killed_while_removing(monkeypatch, folder.name, everything_but_config):
        train(cfg(), log=None)
    assert (tmp_path / "checkpoint-2" / "train_state.pt").exists()
    train(cfg(), log=None)
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-3"]


@pytest.mark.parametrize("name", ["log.jsonl", "skipped.rank0.jsonl"])
def test_a_kill_while_resuming_loses_no_log_line(tiny_dir, meta, tmp_path, monkeypatch, name):
    """Resuming cuts log.jsonl and the skip log back to the checkpoint; a kill while it rewrites
    them must leave the old file whole (not truncated), so the next resume still ends as the
    uninterrupted run."""

    def cfg(out):
        return _cfg(tiny_dir, meta, tmp_path / out, max_steps=4, save_steps=2)

    train(cfg("a"), log=None)
    real_step = Trainer.train_step

    def dying_step(self):
        if self.step == 3:
            raise Killed  # after checkpoint-2 and the log line of step 3
        return real_step(self)

    monkeypatch.setattr(Trainer, "train_step", dying_step)
    with pytest.raises(Killed):
        train(cfg("b"), log=None)
    monkeypatch.setattr(Trainer, "train_step", real_step)
    real_write = Path.write_text

    def dying_write(self, *args, **kwargs):
        if name in self.name:  # the file (or a temporary one) is opened, truncated, and the process dies
            real_write(self, "")
            raise Killed
        return real_write(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", dying_write)
    with pytest.raises(Killed):
        train(cfg("b"), log=None)
    monkeypatch.setattr(Path, "write_text", real_write)
    train(cfg("b"), log=None)
    for f in ("log.jsonl", "skipped.rank0.jsonl"):
        a, b = [(tmp_path / d / f).read_text().splitlines() for d in "ab"]
        if f == "log.jsonl":  # all but the timing
            a, b = [
                [{k: v for k, v in json.loads(ln).items() if k != "tokens_per_s"} for ln in x] for x in (a, b)
            ]
        assert a == b and len(a) >= 1


def test_a_corrupt_train_state_is_refused_naming_the_file(tiny_dir, meta, tmp_path):
    train(_cfg(tiny_dir, meta, tmp_path, max_steps=2, save_steps=1), log=None)
    state = tmp_path / "checkpoint-2" / "train_state.pt"
    state.write_bytes(state.read_bytes()[:1000])  # truncated
    with pytest.raises(CheckpointError, match="checkpoint-2/train_state.pt"):
        train(_cfg(tiny_dir, meta, tmp_path, max_steps=3, save_steps=1), log=None)


@pytest.mark.parametrize("preset", ["tiny", "tiny-internlm2", "tiny-phi3", "tiny-qwen3"])
def test_lora_on_fused_projections_is_upstreams(preset):
    """InternLM2 (wqkv) and Phi-3 (qkv_proj, gate_up_proj) hold fused matrices upstream, whose LoRA is
    one A and a split B: the same trainable parameters here, and the same merged fused matrix."""
    from interleaf.model.presets import build_model, preset_config
    from interleaf.train.lora import FUSED_GROUPS, apply_llm_lora

    model = build_model(preset_config(preset))
    r = 4
    apply_llm_lora(model, r)
    model.eval()  # no LoRA dropout
    groups = FUSED_GROUPS.get(model.config.llm.family, ())
    # upstream fuses only InternLM2 (wqkv) and Phi-3 (qkv_proj, gate_up_proj); Qwen2/3 keep them apart
    qkv, gate_up = ("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")
    assert groups == {"internlm2": (qkv,), "phi3": (qkv, gate_up)}.get(model.config.llm.family, ())
    layer = model.language_model.model.layers[0]
    attn, mlp = layer.self_attn, layer.mlp
    shared_qkv = attn.q_proj.lora_A is attn.k_proj.lora_A is attn.v_proj.lora_A
    assert shared_qkv == (("q_proj", "k_proj", "v_proj") in groups)
    assert (mlp.gate_proj.lora_A is mlp.up_proj.lora_A) == (("gate_proj", "up_proj") in groups)
    assert attn.o_proj.lora_A is not attn.q_proj.lora_A
    # trainable parameters = upstream's adapters: one (A, B) per matrix of the original layout
    h = model.config.llm.hidden_size
    sizes = {"q_proj": attn.q_proj, "k_proj": attn.k_proj, "v_proj": attn.v_proj, "o_proj": attn.o_proj,
             "gate_proj": mlp.gate_proj, "up_proj": mlp.up_proj, "down_proj": mlp.down_proj}  # fmt: skip
    matrices = [list(g) for g in groups] + [
        [n] for n in sizes if not any(n in g for g in groups)
    ]  # the original layout's matrices
    expect = sum(
        r * sizes[g[0]].base.in_features + sum(sizes[n].base.out_features for n in g) * r for g in matrices
    )
    per_layer = sum(p.numel() for n, p in layer.named_parameters() if "lora_" in n)
    assert per_layer == expect
    if not shared_qkv:
        return  # Qwen2 / Qwen3: separate matrices upstream too
    # merging gives the fused matrix W + s * [B_q; B_k; B_v] @ A
    g = torch.Generator().manual_seed(0)
    for m in (attn.q_proj, attn.k_proj, attn.v_proj):
        m.lora_B.data = torch.randn(m.lora_B.shape, generator=g)
    fused_w = torch.cat([m.base.weight for m in (attn.q_proj, attn.k_proj, attn.v_proj)])
    fused_b = torch.cat([m.lora_B for m in (attn.q_proj, attn.k_proj, attn.v_proj)])
    expect_w = fused_w + attn.q_proj.scaling * fused_b @ attn.q_proj.lora_A
    x = torch.randn(3, h, generator=g)
    out = torch.cat([m(x) for m in (attn.q_proj, attn.k_proj, attn.v_proj)], dim=-1)
    bias = torch.cat([m.base.bias if m.base.bias is not None else torch.zeros(m.base.out_features)
                      for m in (attn.q_proj, attn.k_proj, attn.v_proj)])  # fmt: skip
    torch.testing.assert_close(out, x @ expect_w.t() + bias)
    merge_lora(model)
    merged = torch.cat([attn_m.weight for attn_m in (layer.self_attn.q_proj, layer.self_attn.k_proj,
                                                      layer.self_attn.v_proj)])  # fmt: skip
    torch.testing.assert_close(merged, expect_w)


def test_a_one_micro_batch_step_backpropagates_the_plain_mean_loss(tiny_dir, meta, tmp_path, monkeypatch):
    """One process, grad_accum 1: the gradients are exactly those of sum(w * CE) / sum(w), the step's
    rescale is exactly 1.0 (the step-wide normalisation must not perturb the common case)."""
    import copy

    import interleaf.train.trainer as T

    tr = Trainer(_cfg(tiny_dir, meta, tmp_path, max_steps=1, grad_accum=1, max_grad_norm=0), log=None).setup()
    reference = copy.deepcopy(tr.step_module)
    seen, real_next, real_step = {}, tr._next_micro_batch, T.optimizer_step

    def next_batch():
        seen["batch"] = real_next()
        return seen["batch"]

    def step(optimizer, master, max_grad_norm, grad_scale=1.0):
        seen["scale"] = grad_scale
        seen["grads"] = {n: p.grad.clone() for n, p in tr.raw_model.named_parameters() if p.grad is not None}
        return real_step(optimizer, master, max_grad_norm, grad_scale)

    monkeypatch.setattr(tr, "_next_micro_batch", next_batch)
    monkeypatch.setattr(T, "optimizer_step", step)
    tr.train_step()
    loss_sum, weight = reference(seen["batch"])
    (loss_sum / weight).backward()
    want = {n: p.grad for n, p in reference.model.named_parameters() if p.grad is not None}
    assert seen["scale"] == 1.0 and seen["grads"].keys() == want.keys() and want
    assert all(torch.equal(seen["grads"][n], want[n]) for n in want)


def test_a_fresh_run_keeps_the_checkpoint_it_starts_from(tiny_dir, meta, tmp_path):
    """Stage 2 from out/checkpoint-1 into out/ with resume: false must not delete its own start."""
    train(_cfg(tiny_dir, meta, tmp_path, max_steps=1), log=None)
    start = tmp_path / "checkpoint-1"
    result = train(_cfg(start, meta, tmp_path, max_steps=2, resume=False), log=None)
    assert start.is_dir() and Path(result["checkpoint"]).name == "checkpoint-2"


def test_pruning_keeps_the_checkpoint_a_run_starts_from(tiny_dir, meta, tmp_path):
    """save_total_limit never removes the model_path a run in the same output_dir starts from (a
    resumed LoRA run loads its base from there again)."""
    train(_cfg(tiny_dir, meta, tmp_path, max_steps=1), log=None)
    start = tmp_path / "checkpoint-1"
    cfg = _cfg(start, meta, tmp_path, max_steps=4, save_steps=2, save_total_limit=1, resume=False)
    result = train(cfg, log=None)
    assert (start / "model.safetensors").exists() and Path(result["checkpoint"]).name == "checkpoint-4"
    assert not (tmp_path / "checkpoint-2").exists()


def test_a_run_that_would_save_over_its_start_checkpoint_is_refused(tiny_dir, meta, tmp_path):
    """Stage 2 from out/checkpoint-1 into out/ saving at step 1 would replace its own start weights."""
    train(_cfg(tiny_dir, meta, tmp_path, max_steps=1), log=None)
    start = tmp_path / "checkpoint-1"
    before = (start / "model.safetensors").read_bytes()
    for steps in (dict(max_steps=3, save_steps=1), dict(max_steps=1)):
        with pytest.raises(ConfigError, match="checkpoint-1 of output_dir .* saves again at step 1"):
            train(_cfg(start, meta, tmp_path, resume=False, **steps), log=None)
    assert (start / "model.safetensors").read_bytes() == before
    # a run that never saves step 1 may start there
    result = train(_cfg(start, meta, tmp_path, resume=False, max_steps=2, save_steps=2), log=None)
    assert Path(result["checkpoint"]).name == "checkpoint-2"
    assert (start / "model.safetensors").read_bytes() == before


def test_preset_init_folder_follows_preset_and_overrides(meta, tmp_path):
    common = dict(meta_path=str(meta), output_dir=str(tmp_path), max_steps=1, max_dynamic_patch=1,
                  max_seq_length=160, max_packed_tokens=160, device="cpu", dtype="fp32", resume=False)  # fmt: skip
    t = Trainer(build_config({"model_preset": "tiny", **common}), log=None).setup()
    assert t.raw_model.config.llm.family == "qwen2"
    cfg = build_config(
        {"model_preset": "tiny-internlm2", "model_overrides": {"llm.num_hidden_layers": 1}, **common}
    )
    t = Trainer(cfg, log=None).setup()
    assert t.raw_model.config.llm.family == "internlm2" and len(t.raw_model.language_model.model.layers) == 1
    with pytest.raises(ConfigError, match="'llm.num_hidden_layers': must be int"):
        Trainer(build_config({"model_preset": "tiny", "model_overrides": {"llm.num_hidden_layers": "2"}, **common}),
                log=None).setup()  # fmt: skip


def test_tile_range_and_drop_path_defaults(tiny_dir, meta, tmp_path):
    with pytest.raises(ConfigError, match="min_dynamic_patch': 4 is above max_dynamic_patch 2"):
        _cfg(tiny_dir, meta, tmp_path, min_dynamic_patch=4, max_dynamic_patch=2)
    # a checkpoint whose config carries a rate (released fine-tunes do) trains without it unless asked
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_dir, ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    config["vision_config"]["drop_path_rate"] = 0.1
    (ckpt / "config.json").write_text(json.dumps(config))
    t = Trainer(_cfg(ckpt, meta, tmp_path / "run"), log=None).setup()
    assert all(b.drop_path1.p == 0.0 for b in t.raw_model.vision_model.encoder.layers)
    assert t.raw_model.config.vision.drop_path_rate == 0.0
