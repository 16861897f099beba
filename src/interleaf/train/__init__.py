"""interleaf.train: fine-tuning and staged pretraining of InternVL-family models, in plain PyTorch.

* ``data``: InternVL's meta JSON + JSONL conversation format (``<image>`` checks, auto-prepend, ``<video>``
  frames, per-template loss masks, truncation that never cuts an image, bad-sample accounting) and
  OmniCorpus-layout interleaved documents / image-text pairs for pretraining.
* ``packing``: resumable sample streams, greedy packing under token and tile budgets, collation with
  per-sample positions, block-causal masks, per-sample ("varlen") attention and loss weights
  (``token`` / ``sample`` / ``square``).
* ``trainer``: AdamW with per-part learning rates, cosine warm-up, gradient accumulation, clipping,
  bf16 autocast, gradient checkpointing, freeze flags and stage presets, LoRA, atomic checkpoints with
  exact resume, DDP / FSDP2 under torchrun, JSONL (and optional TensorBoard) logs.
* ``adapt``: Mini-InternVL domain adaptation (COCO detection/grounding, classification, multi-view
  stitching, video frames -> conversations; fine-tuning with general data mixed in).
* ``demo``: ``interleaf demo``.

Command line::

    interleaf train CONFIG.yaml [--set key=value ...]
    torchrun --nproc_per_node 8 -m interleaf.cli train CONFIG.yaml
    interleaf adapt convert coco-det|classification|multiview|video ...
    interleaf adapt CONFIG.yaml
    interleaf demo
"""
