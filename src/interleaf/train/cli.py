"""Sub-commands ``interleaf demo``, ``train``, ``adapt``, ``lcl`` and ``visionllm`` (cheap to import)."""

from __future__ import annotations

import argparse
import os


def register(subparsers: argparse._SubParsersAction) -> None:
    demo = subparsers.add_parser(
        "demo",
        help="train a tiny InternVL from random weights on offline images, then quiz it (CPU, minutes)",
    )
    demo.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    demo.add_argument("--steps", type=int, default=2000, help="training steps (default: 2000)")
    demo.add_argument(
        "--image-size", type=int, default=224, help="tile size in px (default 224; 448 = full size)"
    )
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)

    train = subparsers.add_parser(
        "train", help="train or fine-tune from a YAML config (InternVL data format)"
    )
    train.add_argument("config", nargs="?", help="YAML config file")
    train.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key",
    )
    train.set_defaults(func=_train)

    adapt = subparsers.add_parser(
        "adapt",
        help="domain adaptation: 'adapt convert KIND ...' to the conversation format, or 'adapt CONFIG.yaml'",
    )
    adapt.add_argument("args", nargs=argparse.REMAINDER, help="convert KIND ... | CONFIG.yaml [--set k=v]")
    adapt.set_defaults(func=_adapt)

    lcl = subparsers.add_parser(
        "lcl", help="LCL: vision pretraining on interleaved data by latent compression"
    )
    lsub = lcl.add_subparsers(dest="lcl_command", metavar="LCL_COMMAND")
    lcl.set_defaults(func=lambda a: (lcl.print_help(), 2)[1])
    p = lsub.add_parser(
        "pretrain", help="train a ViT from scratch on pairs / interleaved documents (resumable)"
    )
    p.add_argument(
        "data", nargs="+", help="corpus builds, interleaved-document or pair files (JSONL/Parquet)"
    )
    p.add_argument("-o", "--out", required=True, help="output folder (rerun with the same to resume)")
    p.add_argument(
        "--preset", default="tiny", help="tiny | lcl-vit-b-16-laion | lcl-vit-b-32-laion | lcl-vit-b-32-mmc4"
    )
    p.add_argument("--init", default=None, help="start from an LCL checkpoint folder")
    p.add_argument("--tokenizer", default="offline", help="a tokenizer folder (e.g. CLIP's), or 'offline'")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=8, help="per process")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=None, help="default: min(2000, steps / 10)")
    p.add_argument("--weight-decay", type=float, default=0.2)
    p.add_argument("--generation-weight", type=float, default=1.0)
    p.add_argument("--contrastive-weight", type=float, default=0.1)
    p.add_argument("--img-first-prob", type=float, default=0.5, help="pairs: image before the text")
    p.add_argument("--max-images", type=int, default=6, help="documents: images kept")
    p.add_argument("--sim-threshold", type=float, default=0.24, help="MMC4 rows: least image-text similarity")
    p.add_argument(
        "--mmc4-image-root",
        default=None,
        help="MMC4 rows: folder of image_name (default: the file's); the corpus build folder for rows "
        "corpus convert --to mmc4 wrote outside it",
    )
    p.add_argument("--context-length", type=int, default=None, help="default: the preset's")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--save-every", type=int, default=50)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (the GPU where there is one) | cuda | cpu")
    p.add_argument(
        "--precision", choices=["fp32", "bf16"], default="fp32", help="bf16: autocast, fp32 weights"
    )
    p.set_defaults(func=_lcl_pretrain)
    r = lsub.add_parser("retrieval", help="zero-shot image-text retrieval recall@k of an LCL model on pairs")
    r.add_argument("model", help="the model folder pretrain wrote (OUT/model)")
    r.add_argument("data", nargs="+", help="image-text pair files (JSONL/Parquet) or corpus builds")
    r.add_argument("--batch-size", type=int, default=64)
    r.add_argument("--tokenizer", default=None, help="default: MODEL/tokenizer (pretrain saves it there)")
    r.add_argument("--device", default="auto", help="auto (the GPU where there is one) | cuda | cpu")
    r.set_defaults(func=_lcl_retrieval)
    e = lsub.add_parser("export-vit", help="the pretrained ViT as a transformers CLIPVisionModel folder")
    e.add_argument("model", help="an LCL model folder (OUT/model) or checkpoint folder")
    e.add_argument("-o", "--out", required=True)
    e.set_defaults(func=_lcl_export)

    vl = subparsers.add_parser(
        "visionllm",
        help="VisionLLM v2: an MLLM that routes detection, image generation and editing to decoders via super links",
    )
    vsub = vl.add_subparsers(dest="visionllm_command", metavar="VISIONLLM_COMMAND")
    vl.set_defaults(func=lambda a: (vl.print_help(), 2)[1])
    i = vsub.add_parser(
        "init",
        help="a random-weight model (an interleaf preset + a tiny Grounding DINO, optional diffusion tools)",
    )
    i.add_argument("-o", "--out", required=True)
    i.add_argument("--preset", default="tiny", help="an interleaf model preset (default: tiny)")
    i.add_argument(
        "--image-size", type=int, default=None, help="the MLLM's tile size (default: the preset's)"
    )
    i.add_argument(
        "--max-tiles", type=int, default=None, help="the MLLM's tile budget (default: the preset's)"
    )
    i.add_argument("--detector-size", type=int, default=128, help="the detector's shortest image edge")
    i.add_argument(
        "--gen",
        default=None,
        help="'tiny' or a Stable Diffusion pipeline folder (diffusers) for [GEN] routes",
    )
    i.add_argument(
        "--edit",
        default=None,
        help="'tiny' or an InstructPix2Pix pipeline folder (diffusers) for [EDIT] routes",
    )
    i.add_argument(
        "--train-gen-unet", action="store_true", help="train the [GEN] UNet too (upstream keeps it frozen)"
    )
    i.add_argument(
        "--region-encoder", action="store_true", help="add the <region> token and upstream's region encoder"
    )
    i.add_argument(
        "--mask-dim",
        type=int,
        default=0,
        help="give the detector upstream's mask head of this width, for [SEG] masks (upstream: 256; "
        "default 0: boxes only)",
    )
    i.add_argument(
        "--dn-number",
        type=int,
        default=0,
        help="train the detector with contrastive denoising: N // (most objects of an image) groups of a "
        "positive and a negative query per object (upstream: 100; default 0: none)",
    )
    i.add_argument("--seed", type=int, default=0)
    i.set_defaults(func=_visionllm_init)
    t = vsub.add_parser(
        "train", help="fine-tune on detection, generation, editing and region records (JSONL)"
    )
    t.add_argument(
        "data",
        help="records: {image, objects: [{phrase, box, mask?}], phrases?, question?, route?} (detection; "
        "mask: COCO polygons or RLE), "
        "{route: gen, caption, output_image}, {route: edit, image, caption, output_image} or "
        "{image, regions: [[x1, y1, x2, y2]], question, answer} (visual prompts)",
    )
    t.add_argument("--model", required=True, help="a VisionLLM v2 folder (from init or train)")
    t.add_argument(
        "-o", "--out", required=True, help="folder for the trained model and its logs (rerun to resume)"
    )
    t.add_argument("--image-root", default=None, help="folder of relative image paths (default: the file's)")
    t.add_argument("--steps", type=int, default=200)
    t.add_argument("--batch-size", type=int, default=4)
    t.add_argument("--lr", type=float, default=1e-4)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="auto", help="auto (the GPU where there is one) | cuda | cpu")
    t.add_argument("--save-every", type=int, default=50, help="steps between resumable states")
    t.add_argument(
        "--deterministic",
        action="store_true",
        help="torch's deterministic algorithms: bitwise-repeatable runs and resumes on a GPU (slower)",
    )
    t.add_argument(
        "--freeze",
        default="",
        help="comma-separated parts kept as they are, as upstream's freeze flags: vision, bridge, llm, "
        "region, queries, backbone (the tools' image backbones), gdino, sd, ip2p; decoders-only (stage 3): "
        "vision,bridge,llm,queries, plus region with a region encoder (default: train all; upstream freezes "
        "vision)",
    )
    t.add_argument(
        "--lora-rank", type=int, default=0, help="train the LLM through LoRA of this rank (upstream: 32)"
    )
    t.add_argument(
        "--grad-accum", type=int, default=1, help="micro-batches of --batch-size per step and process"
    )
    t.add_argument(
        "--lr-llm-multiplier",
        type=float,
        default=1.0,
        help="rate factor of the LLM, bridge, region encoder and diffusion mappers (upstream's scripts: 0.1)",
    )
    t.add_argument(
        "--lr-backbone-multiplier",
        type=float,
        default=1.0,
        help="rate factor of the tools' backbones and deformable sampling (upstream's default: 0.1)",
    )
    t.set_defaults(func=_visionllm_train)
    d = vsub.add_parser("detect", help="ask about an image; the answer's [DET] routes go to the detector")
    d.add_argument("model", help="a VisionLLM v2 folder")
    d.add_argument("image")
    d.add_argument("--question", default=None, help="default: 'Please detect PHRASES in the image.'")
    d.add_argument("--phrases", default=None, help="comma-separated phrases for the default question")
    d.add_argument("--threshold", type=float, default=0.3)
    d.add_argument("--max-new-tokens", type=int, default=64)
    d.add_argument("--device", default="auto")
    d.set_defaults(func=_visionllm_detect)
    a = vsub.add_parser(
        "ask", help="ask (about an image or not); each route of the answer goes to its decoder"
    )
    a.add_argument("model", help="a VisionLLM v2 folder")
    a.add_argument("--question", required=True)
    a.add_argument("--image", default=None, help="the image the question is about (an [EDIT] route edits it)")
    a.add_argument("-o", "--out", default=None, help="new folder for answer.json and the generated images")
    a.add_argument("--threshold", type=float, default=0.3, help="the detector's score threshold")
    a.add_argument("--max-new-tokens", type=int, default=128)
    a.add_argument("--steps", type=int, default=None, help="diffusion sampling steps (default: the model's)")
    a.add_argument("--seed", type=int, default=0, help="seeds the diffusion sampling")
    a.add_argument(
        "--region", action="append", default=None, help="x1,y1,x2,y2: the box of the question's next <region>"
    )
    a.add_argument("--device", default="auto")
    a.set_defaults(func=_visionllm_ask)
    e = _visionllm_eval_parser(
        vsub,
        "eval-det",
        "COCO box AP (and mask AP) of the detection route on detection records (upstream's eval_det, "
        "pycocotools)",
        "JSONL detection records {image, objects: [{phrase, box, mask?}]} (train's format; mask AP when "
        "they hold masks and the detector has a mask head)",
    )
    e.add_argument(
        "--phrases", default=None, help="comma-separated categories, in order (default: the data's phrases)"
    )
    e.add_argument("--topk", type=int, default=100, help="detections kept per image (upstream: 100)")
    e.set_defaults(func=_visionllm_eval_det)
    g = _visionllm_eval_parser(
        vsub,
        "eval-grd",
        "referring expressions (RefCOCO-style): P@0.5..0.9, oIoU and mIoU of the [GRD] route's top "
        "detection, boxes and masks (upstream's RefCOCOeval)",
        "JSONL records {image, objects: [{phrase, box, mask?}], route: grd, question?}, one object each: "
        "the phrase is the expression",
    )
    g.set_defaults(func=_visionllm_eval_grd)


def _demo(args: argparse.Namespace) -> int:
    from interleaf.train.demo import run_demo

    run_demo(out=args.out, steps=args.steps, image_size=args.image_size, seed=args.seed)
    return 0


def _train(args: argparse.Namespace) -> int:
    import os

    from interleaf.train.config import load_config
    from interleaf.train.trainer import train

    cfg = load_config(args.config, args.overrides)
    result = train(cfg)
    if int(os.environ.get("RANK", 0)) == 0:
        print(result["checkpoint"])
    return 0


def _adapt(args: argparse.Namespace) -> int:
    from interleaf.train.adapt import main

    return main(args.args)


def _lcl_pretrain(args: argparse.Namespace) -> int:
    import os

    from interleaf.errors import InputError, check_minimums
    from interleaf.train.lcl import LCLTrainConfig, pretrain

    check_minimums(("--steps", args.steps, 1), ("--batch-size", args.batch_size, 1),
                   ("--save-every", args.save_every, 1), ("--log-every", args.log_every, 1),
                   ("--max-images", args.max_images, 1), ("--warmup", args.warmup, 0))  # fmt: skip
    if not 0 <= args.img_first_prob <= 1:
        raise InputError(f"--img-first-prob must be in [0, 1], got {args.img_first_prob}")
    cfg = LCLTrainConfig(
        data=args.data,
        output_dir=args.out,
        preset=args.preset,
        init=args.init,
        tokenizer=args.tokenizer,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup=args.warmup,
        weight_decay=args.weight_decay,
        generation_weight=args.generation_weight,
        contrastive_weight=args.contrastive_weight,
        img_first_prob=args.img_first_prob,
        max_images=args.max_images,
        sim_threshold=args.sim_threshold,
        mmc4_image_root=args.mmc4_image_root,
        context_length=args.context_length,
        grad_checkpointing=args.grad_checkpointing,
        save_every=args.save_every,
        log_every=args.log_every,
        seed=args.seed,
        device=args.device,
        precision=args.precision,
    )
    result = pretrain(cfg)
    if int(os.environ.get("RANK", 0)) == 0:
        print(result["model"])
    return 0


def _lcl_retrieval(args: argparse.Namespace) -> int:
    import json

    from interleaf.train.lcl import retrieval

    result = retrieval(
        args.model,
        args.data,
        batch_size=max(1, args.batch_size),
        tokenizer=args.tokenizer,
        device=args.device,
    )
    print(json.dumps(result, indent=1))
    return 0


def _lcl_export(args: argparse.Namespace) -> int:
    from interleaf.model.lcl import export_vision, load_lcl

    print(export_vision(load_lcl(args.model), args.out))
    return 0


def _visionllm_init(args: argparse.Namespace) -> int:
    from interleaf.train.visionllm import init_command

    print(init_command(args.out, args.preset, args.image_size, args.max_tiles, args.detector_size, args.seed,
                       args.gen, args.edit, args.train_gen_unet, args.region_encoder,
                       args.mask_dim, args.dn_number))  # fmt: skip
    return 0


def _visionllm_train(args: argparse.Namespace) -> int:
    from interleaf.train.visionllm import train_command

    summary = train_command(args.data, args.model, args.out, image_root=args.image_root, steps=args.steps,
                            batch_size=args.batch_size, lr=args.lr, seed=args.seed, device=args.device,
                            save_every=args.save_every, deterministic=args.deterministic,
                            freeze=args.freeze,
                            lora_rank=args.lora_rank, lr_llm_multiplier=args.lr_llm_multiplier,
                            lr_backbone_multiplier=args.lr_backbone_multiplier,
                            grad_accum=args.grad_accum)  # fmt: skip
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one summary
        print(summary)
    return 0


def _visionllm_detect(args: argparse.Namespace) -> int:
    import json

    from interleaf.train.visionllm import detect_command

    result = detect_command(args.model, args.image, args.question, args.phrases, args.threshold,
                            args.max_new_tokens, args.device)  # fmt: skip
    print(json.dumps(result, ensure_ascii=False, indent=2))
    return 0


def _visionllm_eval_parser(
    vsub: argparse._SubParsersAction, name: str, help: str, data_help: str
) -> argparse.ArgumentParser:
    """A ``visionllm`` evaluation command's parser with the arguments eval-det and eval-grd share."""
    e = vsub.add_parser(name, help=help)
    e.add_argument("model", help="a VisionLLM v2 folder with a detector")
    e.add_argument("data", help=data_help)
    e.add_argument(
        "-o", "--out", required=True, help="folder for the detections, scores and report (resumable)"
    )
    e.add_argument("--image-root", default=None, help="folder of relative image paths (default: the file's)")
    e.add_argument("--limit", type=int, default=None, help="evaluate the first N records only")
    e.add_argument("--device", default="auto")
    return e


def _visionllm_eval_det(args: argparse.Namespace) -> int:
    import json

    from interleaf.eval.detection import evaluate_detection

    phrases = [p for p in args.phrases.split(",") if p.strip()] if args.phrases is not None else None
    summary = evaluate_detection(args.model, args.data, args.out, phrases=phrases, image_root=args.image_root,
                                 topk=args.topk, limit=args.limit, device=args.device)  # fmt: skip
    print(json.dumps(summary, indent=1))
    return 0


def _visionllm_eval_grd(args: argparse.Namespace) -> int:
    import json

    from interleaf.eval.detection import evaluate_grounding

    summary = evaluate_grounding(args.model, args.data, args.out, image_root=args.image_root, limit=args.limit,
                                 device=args.device)  # fmt: skip
    print(json.dumps(summary, indent=1))
    return 0


def _visionllm_ask(args: argparse.Namespace) -> int:
    import json

    from interleaf.train.visionllm import ask_command

    result = ask_command(args.model, args.question, args.image, args.out, args.threshold, args.max_new_tokens,
                         args.steps, args.seed, args.device, args.region)  # fmt: skip
    print(json.dumps(result, ensure_ascii=False, indent=2))
    return 0
