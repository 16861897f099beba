"""Corpus engine throughput vs datatrove's text pipeline, on the same WARC, in one run.

    .venv/bin/python benchmarks/bench_corpus.py [--pages 2000] [--repeats 3] [--quick]

interleaf: the full local engine with one worker process (read -> extract keeping images in
place -> default text filters -> MinHash signatures -> URL/MinHash/image-URL dedup -> Parquet).
datatrove (the FineWeb recipe's text part): WarcReader -> Trafilatura(favour_precision) ->
GopherRepetition -> GopherQuality -> C4Quality -> FineWebQuality -> JsonlWriter, one task, one
worker. Each runs in a fresh interpreter and is charged the CPU time of its whole process tree
(interleaf's driver and worker process; datatrove's executor and extractor sandbox; imports
included), so "docs per CPU-second" is per-core throughput and immune to the machine's load.

Also: time per stage (interleaf's per-step timers), MinHash throughput on 100k synthetic
documents (signatures, LSH buckets, clusters; CPU time of this process), and OmniCorpus' published rates (33.3 docs/CPU-s
main-body extraction, 109 docs/CPU-s rule filtering, 38.8 docs/CPU-s dedup).
Needs the ``bench`` extra (datatrove, trafilatura) for the comparison; ``--skip-datatrove`` runs
interleaf alone. ``--device`` is accepted for uniformity with other benchmarks (CPU-only work).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

OMNICORPUS = {"extraction": 33.3, "rule_filtering": 109.0, "dedup": 38.8}


def cpu_seconds() -> float:
    me = resource.getrusage(resource.RUSAGE_SELF)
    ch = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + ch.ru_utime + ch.ru_stime


def run_interleaf(warc: Path, work: Path, overrides: dict | None = None) -> dict:
    from interleaf.corpus import engine as E
    from interleaf.corpus import pipeline as P

    out = work / "interleaf"
    shutil.rmtree(out, ignore_errors=True)
    cfg = P.load_config({"read": {"shard_size": 500}, **(overrides or {})})
    c0, t0 = cpu_seconds(), time.perf_counter()
    plan = E.prepare_run([warc], out, cfg)
    n_shards = E.run_stage1_local(plan, workers=1, progress=False)
    c1, t1 = cpu_seconds(), time.perf_counter()
    E.run_dedup_local(plan, n_shards)
    c2, t2 = cpu_seconds(), time.perf_counter()
    E.run_finalize_local(plan, n_shards, progress=False)
    stats = E.finish(plan, n_shards, progress=False)
    c3, t3 = cpu_seconds(), time.perf_counter()
    steps = {s["name"]: s["time_s"] for s in stats["stages"] if s["time_s"]}
    steps_in = {s["name"]: s["docs_in"] for s in stats["stages"]}
    return {
        "records": stats["records_in"],
        "docs_out": stats["docs_out"],
        "images_out": stats["images_out"],
        "cpu_s": c3 - c0,
        "wall_s": t3 - t0,
        "phase_cpu_s": {"extract+filter": c1 - c0, "dedup": c2 - c1, "write": c3 - c2},
        "phase_wall_s": {"extract+filter": t1 - t0, "dedup": t2 - t1, "write": t3 - t2},
        "step_s": steps,
        "step_docs_in": steps_in,
    }


def run_datatrove(warc: Path, work: Path) -> dict:
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.extractors import Trafilatura
    from datatrove.pipeline.filters import (
        C4QualityFilter,
        FineWebQualityFilter,
        GopherQualityFilter,
        GopherRepetitionFilter,
    )
    from datatrove.pipeline.readers import WarcReader
    from datatrove.pipeline.writers import JsonlWriter

    out = work / "datatrove"
    shutil.rmtree(out, ignore_errors=True)
    pipeline = [
        WarcReader(str(warc.parent), glob_pattern=warc.name),
        Trafilatura(favour_precision=True),
        GopherRepetitionFilter(),
        GopherQualityFilter(),
        C4QualityFilter(filter_no_terminal_punct=False),
        FineWebQualityFilter(),
        JsonlWriter(str(out / "output")),
    ]
    ex = LocalPipelineExecutor(pipeline=pipeline, tasks=1, workers=1, logging_dir=str(out / "logs"))
    c0, t0 = cpu_seconds(), time.perf_counter()
    ex.run()
    c1, t1 = cpu_seconds(), time.perf_counter()
    stats = json.loads((out / "logs" / "stats.json").read_text())
    docs_out = 0
    for blk in stats:
        if "Writer" in blk.get("name", "") or "Jsonl" in blk.get("name", ""):
            docs_out = int(blk.get("stats", {}).get("total", 0))
    step_s = {}
    for blk in stats:
        t = blk.get("time_stats", {})
        total = t.get("total") if isinstance(t, dict) else None
        if total:
            step_s[blk.get("name", "?")] = total
    return {"cpu_s": c1 - c0, "wall_s": t1 - t0, "docs_out": docs_out, "step_s": step_s}


def run_isolated(which: str, warc: Path, work: Path) -> dict:
    """Run one pipeline in a fresh interpreter; charge it all CPU time of that process tree."""
    import subprocess

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, __file__, "--one", which, "--warc", str(warc), "--work", str(work)],
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"{which} run failed:\n{proc.stderr[-3000:]}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["process_cpu_s"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    res["process_wall_s"] = wall
    return res


def bench_minhash(n_docs: int, seed: int = 0) -> dict:
    import numpy as np

    from interleaf.corpus import dedup as D

    rng = np.random.default_rng(seed)
    vocab = np.array([f"w{i}" for i in range(20000)])
    base = [" ".join(vocab[rng.integers(0, len(vocab), rng.integers(150, 450))]) for _ in range(n_docs // 2)]
    docs = list(base)
    for i in range(n_docs - len(base)):  # half of the set: near duplicates (1% of words changed)
        ws = base[i].split()
        for j in rng.integers(0, len(ws), max(1, len(ws) // 100)):
            ws[j] = vocab[rng.integers(0, len(vocab))]
        docs.append(" ".join(ws))
    mh = D.MinHasher()
    t0 = time.process_time()
    sigs = np.concatenate([mh.signatures(docs[i : i + 5000]) for i in range(0, n_docs, 5000)])
    t1 = time.process_time()
    keys = mh.band_keys(sigs)
    edges = [D.band_edges(keys[:, j], sigs, 0.8) for j in range(mh.config.num_bands)]
    t2 = time.process_time()
    surv = D.minhash_duplicates(None, sigs, [None] * n_docs, edges=edges)
    t3 = time.process_time()
    removed = int((surv != np.arange(n_docs)).sum())
    return {
        "docs": n_docs,
        "signature_s": t1 - t0,
        "lsh_s": t2 - t1,
        "cluster_s": t3 - t2,
        "docs_per_s": n_docs / (t3 - t0),
        "signature_docs_per_s": n_docs / (t1 - t0),
        "removed": removed,
        "expected_removed_about": n_docs - len(base),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pages", type=int, default=2000, help="HTML pages in the benchmark WARC")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--minhash-docs", type=int, default=100_000)
    ap.add_argument("--quick", action="store_true", help="small sizes, one repeat")
    ap.add_argument("--skip-datatrove", action="store_true")
    ap.add_argument("--device", default="cpu", help="ignored: the corpus engine is CPU work")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--one", choices=("interleaf", "datatrove"), help=argparse.SUPPRESS)
    ap.add_argument("--warc", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:  # child mode: one pipeline, result as the last stdout line
        fn = run_interleaf if args.one == "interleaf" else run_datatrove
        print(json.dumps(fn(args.warc, args.work)))
        return
    if args.quick:
        args.pages, args.repeats, args.minhash_docs = 300, 1, 10_000

    from interleaf.corpus.sample import make_bench_warc

    work = Path(tempfile.mkdtemp(prefix="bench_corpus_"))
    try:
        warc = work / "bench.warc.gz"
        make_bench_warc(warc, args.pages)
        il, dt = [], []
        for _ in range(args.repeats):
            il.append(run_isolated("interleaf", warc, work))
            if not args.skip_datatrove:
                dt.append(run_isolated("datatrove", warc, work))
        mh = bench_minhash(args.minhash_docs)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    n = il[0]["records"]
    il_rate = statistics.median(n / r["process_cpu_s"] for r in il)
    res = {
        "machine": f"{platform.node()} {platform.processor() or platform.machine()} ({os.cpu_count()} cpus)",
        "date": time.strftime("%Y-%m-%d"),
        "python": sys.version.split()[0],
        "pages": n,
        "interleaf_docs_per_cpu_s": il_rate,
        "interleaf_pipeline_cpu_s": statistics.median(r["cpu_s"] for r in il),
        "interleaf_process_cpu_s": statistics.median(r["process_cpu_s"] for r in il),
        "interleaf_docs_out": il[0]["docs_out"],
        "interleaf_images_out": il[0]["images_out"],
        "interleaf_phase_cpu_s": {
            k: statistics.median(r["phase_cpu_s"][k] for r in il) for k in il[0]["phase_cpu_s"]
        },
        "interleaf_step_s": {
            k: statistics.median(r["step_s"].get(k, 0) for r in il) for k in il[0]["step_s"]
        },
        "minhash": mh,
    }
    # per-step rates: documents that entered the step / the step's own time (worker-side timers)
    step_in = il[0]["step_docs_in"]
    extract_s = res["interleaf_step_s"].get("extract", 0.0)
    filters = [
        k
        for k in res["interleaf_step_s"]
        if k not in ("extract", "read", "write") and not k.startswith("dedup")
    ]
    filter_s = sum(res["interleaf_step_s"][k] for k in filters)
    res["interleaf_extract_docs_per_s"] = step_in.get("extract", 0) / extract_s if extract_s else None
    first = filters[0] if filters else None
    res["interleaf_filter_docs_per_s"] = step_in.get(first, 0) / filter_s if filter_s else None
    res["interleaf_step_docs_per_s"] = {
        k: step_in.get(k, 0) / v for k, v in res["interleaf_step_s"].items() if v > 0 and step_in.get(k)
    }
    if dt:
        dt_rate = statistics.median(n / r["process_cpu_s"] for r in dt)
        res["datatrove_docs_per_cpu_s"] = dt_rate
        res["datatrove_docs_out"] = dt[0]["docs_out"]
        res["datatrove_pipeline_cpu_s"] = statistics.median(r["cpu_s"] for r in dt)
        res["datatrove_process_cpu_s"] = statistics.median(r["process_cpu_s"] for r in dt)
        res["datatrove_step_s"] = dt[0]["step_s"]
        res["speedup_vs_datatrove"] = il_rate / dt_rate

    print(f"## corpus benchmark ({res['machine']}, {res['date']}, {n} pages, median of {args.repeats})")
    print(
        f"interleaf  : {il_rate:8.1f} docs/CPU-s  ({res['interleaf_docs_out']} docs, {res['interleaf_images_out']} images kept in place)"
    )
    if dt:
        print(
            f"datatrove  : {res['datatrove_docs_per_cpu_s']:8.1f} docs/CPU-s  ({res['datatrove_docs_out']} docs, text only)"
        )
        print(f"ratio      : {res['speedup_vs_datatrove']:.2f}x  (target >= 2x)")
    print(
        "interleaf phases (CPU s): "
        + ", ".join(f"{k} {v:.2f}" for k, v in res["interleaf_phase_cpu_s"].items())
    )
    print(
        "interleaf steps: "
        + ", ".join(
            f"{k} {v:.2f} s ({step_in.get(k, 0)} docs, {res['interleaf_step_docs_per_s'].get(k, 0):.0f}/s)"
            for k, v in res["interleaf_step_s"].items()
        )
    )
    if res["interleaf_extract_docs_per_s"]:
        print(
            f"extraction : {res['interleaf_extract_docs_per_s']:.0f} docs/CPU-s (OmniCorpus {OMNICORPUS['extraction']}: "
            f"{res['interleaf_extract_docs_per_s'] / OMNICORPUS['extraction']:.1f}x)"
        )
    if res["interleaf_filter_docs_per_s"]:
        print(
            f"filtering  : {res['interleaf_filter_docs_per_s']:.0f} docs/CPU-s (OmniCorpus {OMNICORPUS['rule_filtering']}: "
            f"{res['interleaf_filter_docs_per_s'] / OMNICORPUS['rule_filtering']:.1f}x)"
        )
    print(
        f"MinHash    : {mh['docs']} docs in {mh['signature_s'] + mh['lsh_s'] + mh['cluster_s']:.1f} s = "
        f"{mh['docs_per_s']:.0f} docs/s (signatures {mh['signature_docs_per_s']:.0f}/s; LSH {mh['lsh_s']:.2f} s, "
        f"clusters {mh['cluster_s']:.2f} s; removed {mh['removed']} of ~{mh['expected_removed_about']} planted) "
        f"(OmniCorpus dedup {OMNICORPUS['dedup']} docs/CPU-s)"
    )
    print(json.dumps(res))
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
