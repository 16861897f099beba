"""Ray engine: the local engine's stages as Ray tasks, for corpora that outgrow one machine.

The phases, their files and their commit points are those of ``interleaf.corpus.engine`` (so a
Ray run resumes a local run and vice versa, and both give byte-identical output)::

    1. one task per shard: extract -> filters -> MinHash signatures, isolated per document
       (each task runs its documents in a child process with the per-document time limit)
    2. one task per shard: signatures -> LSH band keys; one task per band: the band's buckets
       over the whole corpus (keys of all shards merged) -> verified candidate pairs;
       driver: union-find over all bands' pairs -> keep the latest crawl of each cluster
    3. one task per shard: apply the decisions, write the shard

Shard outputs are written by the tasks to the output directory, which must therefore be on a
file system every node can reach (local disk for one machine, NFS/Lustre/a FUSE mount for a
cluster).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from interleaf.corpus import engine as E
from interleaf.corpus import pipeline as P


def _stage1_task(out: str, shard: int, records: list | str, cfg: dict) -> int:
    if isinstance(records, str):
        # read.shard_by: files -> the task streams its own input file into the pool (a Common
        # Crawl WARC is ~1 GB: only the records in flight are held, as in the local engine)
        records = E.iter_records([Path(records)], int(cfg["read"]["max_page_bytes"]))
    pool = E.IsolatedPool(cfg, workers=1)
    results: dict[int, dict] = {}
    for pos, outcome in pool.imap(enumerate(records)):
        results[pos] = outcome
    E.commit_stage1_shard(
        Path(out), shard, [results[i] for i in range(len(results))], P.minhash_config(cfg).num_perm
    )
    return shard


def _band_keys_task(out: str, shard: int, cfg: dict) -> np.ndarray:
    from interleaf.corpus.dedup import MinHasher

    sig = np.load(E.stage1_dir(Path(out)) / E.shard_name(shard) / "sig.npy")
    return MinHasher(P.minhash_config(cfg)).band_keys(sig)


def _band_edges_task(
    keys: np.ndarray, sigs: np.ndarray | None, threshold: float, valid: np.ndarray
) -> np.ndarray:
    from interleaf.corpus.dedup import band_edges

    return band_edges(keys, sigs, threshold, valid)


def _finalize_task(out: str, cfg: dict, shard: int, decisions: dict) -> int:
    E.finalize_shard(Path(out), cfg, shard, decisions)
    return shard


def _bounded(ray, refs_iter, limit: int, bar=None) -> list:
    """Submit lazily, keeping at most ``limit`` tasks in flight; results in submission order."""
    refs: list = []
    inflight: list = []
    for ref in refs_iter:
        refs.append(ref)
        inflight.append(ref)
        if len(inflight) >= limit:
            done, inflight = ray.wait(inflight, num_returns=1)
            ray.get(done)  # surface task errors early
            if bar is not None:
                bar.update(len(done))
    results = ray.get(refs)
    if bar is not None:
        bar.update(len(inflight))
    return results


def build_ray(
    inputs: list[str | Path],
    out: str | Path,
    cfg: dict | None = None,
    num_cpus: int | None = None,
    address: str | None = None,
    progress: bool = True,
) -> dict:
    """Run (or resume) a build on Ray; returns ``OUT/stats.json``'s content.

    Uses the running Ray instance if there is one, else starts one (``address`` to join a
    cluster, else a local instance with ``num_cpus``).
    """
    import ray
    from tqdm import tqdm

    cfg = cfg or P.load_config()
    plan = E.prepare_run(inputs, out, cfg)
    if (plan.out / "_SUCCESS").exists():
        return json.loads((plan.out / "stats.json").read_text())
    # (prepare_run built a DocProcessor: config errors surfaced there, not inside tasks)
    started = False
    if not ray.is_initialized():
        ray.init(address=address, num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
        started = True
    try:
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        limit = 2 * cpus
        outs = str(plan.out)
        stage1 = ray.remote(num_cpus=1, max_retries=2)(_stage1_task)
        band_keys = ray.remote(num_cpus=1)(_band_keys_task)
        band_edges = ray.remote(num_cpus=1)(_band_edges_task)
        finalize = ray.remote(num_cpus=1, max_retries=2)(_finalize_task)

        marker = plan.out / E.WORK / "stage1.json"
        if marker.exists():
            n_shards = int(json.loads(marker.read_text())["shards"])
        elif cfg["read"]["shard_by"] == "files":
            done = E.committed_stage1(plan.out)
            todo = [s for s in range(len(plan.inputs)) if s not in done]
            bar = tqdm(desc="extract+filter (ray)", unit="file", disable=not progress, leave=False)
            _bounded(ray, (stage1.remote(outs, s, str(plan.inputs[s]), cfg) for s in todo), limit, bar)
            bar.close()
            n_shards = len(plan.inputs)
            E.atomic_write(marker, json.dumps({"shards": n_shards, "records": -1}))
        else:
            size = int(cfg["read"]["shard_size"])
            done = E.committed_stage1(plan.out)
            n_records = 0

            def shards():
                nonlocal n_records
                buf: list[Any] = []
                shard = 0
                for rec in E.iter_records(plan.inputs, int(cfg["read"]["max_page_bytes"])):
                    n_records += 1
                    buf.append(rec)
                    if len(buf) == size:
                        if shard not in done:
                            yield stage1.remote(outs, shard, buf, cfg)
                        buf, shard = [], shard + 1
                if buf and shard not in done:
                    yield stage1.remote(outs, shard, buf, cfg)

            bar = tqdm(desc="extract+filter (ray)", unit="shard", disable=not progress, leave=False)
            _bounded(ray, shards(), limit, bar)
            bar.close()
            n_shards = (n_records + size - 1) // size
            E.atomic_write(marker, json.dumps({"shards": n_shards, "records": n_records}))

        if not E.dedup_dir(plan.out).exists():
            keys, sigs, counts = E.load_keys(plan.out, n_shards)
            mcfg = P.minhash_config(cfg)

            def ray_edges(valid: np.ndarray) -> list[np.ndarray]:
                parts = _bounded(ray, (band_keys.remote(outs, s, cfg) for s in range(n_shards)), limit)
                bk = np.concatenate(parts) if parts else np.zeros((0, mcfg.num_bands), np.uint64)
                sig_ref = ray.put(sigs if mcfg.verify else None)
                valid_ref = ray.put(valid)
                return ray.get(
                    [
                        band_edges.remote(np.ascontiguousarray(bk[:, j]), sig_ref, mcfg.threshold, valid_ref)
                        for j in range(mcfg.num_bands)
                    ]
                )

            decisions = E.compute_dedup(cfg, keys, sigs, band_edges_fn=ray_edges)
            E.commit_dedup(plan.out, decisions, counts)

        decisions = E.load_dedup(plan.out)
        dref = ray.put(decisions)
        todo = [s for s in range(n_shards) if not E.final_done(plan.out, s)]
        _bounded(ray, (finalize.remote(outs, cfg, s, dref) for s in todo), limit)
    finally:
        if started:
            ray.shutdown()
    return E.finish(plan, n_shards, progress)
