"""Ray engine on a real local Ray instance: same output as the local engine, MinHash across tasks."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import ray

from interleaf.corpus import engine as E
from interleaf.corpus import pipeline as P
from interleaf.corpus import ray_engine as R
from test_corpus_engine import TESTS, _cfg, _outputs, _stats_wo_time, make_test_warc


@pytest.fixture(scope="module")
def ray_instance():
    # one Ray instance for the whole module; workers import the test extractor from tests/
    path = os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH", "")) if p)
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": path}},
    )
    yield
    ray.shutdown()


def test_ray_engine_equals_local_engine(ray_instance, tmp_path):
    warc = tmp_path / "in.warc.gz"
    make_test_warc(warc, n=30, seed=5, hang=False, crash=True)
    cfg = P.load_config(_cfg(tmp_path))
    local = E.build([warc], tmp_path / "local", cfg, workers=2, progress=False)
    remote = R.build_ray([warc], tmp_path / "ray", cfg, progress=False)
    assert local["shards"] > 2  # several tasks, so MinHash buckets are merged across them
    assert _outputs(tmp_path / "ray") == _outputs(tmp_path / "local")
    assert _stats_wo_time(tmp_path / "ray") == _stats_wo_time(tmp_path / "local")
    assert remote["balanced"]
    stages = {s["name"]: s for s in remote["stages"]}
    assert stages["dedup_minhash"]["excluded_by_reason"].get("near_duplicate", 0) >= 1
    assert stages["extract"]["errors_by_reason"].get("crash") == 1
    # the near-duplicate pair lives in different shards: the band buckets were merged globally
    excl = [
        json.loads(x)
        for p in (tmp_path / "ray" / "excluded").glob("*.jsonl")
        for x in p.read_text().splitlines()
    ]
    near = [e for e in excl if e["reason"] == "near_duplicate"]
    shard_of: dict[str, int] = {}
    for part in sorted((tmp_path / "ray" / "data").glob("part-*")):
        from interleaf.corpus.fetch import read_docs

        for d in read_docs(part):
            shard_of[d.id] = int(part.name.split("-")[1].split(".")[0])
    assert near and all(e["detail"].removeprefix("kept ") in shard_of for e in near)
    assert any(shard_of[e["detail"].removeprefix("kept ")] != e["shard"] for e in near)


def test_ray_resumes_a_partial_local_run(ray_instance, tmp_path):
    warc = tmp_path / "in.warc.gz"
    make_test_warc(warc, n=20, seed=6, hang=False, crash=False)
    cfg = P.load_config(_cfg(tmp_path))
    ref = E.build([warc], tmp_path / "ref", cfg, workers=1, progress=False)
    # a local run that stopped after phase 1, finished by the Ray engine
    plan = E.prepare_run([warc], tmp_path / "mixed", cfg)
    E.run_stage1_local(plan, workers=1, progress=False)
    got = R.build_ray([warc], tmp_path / "mixed", cfg, progress=False)
    assert got["docs_out"] == ref["docs_out"]
    assert _outputs(tmp_path / "mixed") == _outputs(tmp_path / "ref")


def test_shard_by_files_tasks_read_their_own_files(ray_instance, tmp_path):
    warcs = []
    (tmp_path / "crawl").mkdir()
    for i in range(3):
        w = tmp_path / "crawl" / f"crawl-{i}.warc.gz"
        make_test_warc(w, n=8, seed=20 + i, hang=False, crash=False)
        warcs.append(w)
    cfg = P.load_config(_cfg(tmp_path, read={"shard_by": "files"}))
    local = E.build(warcs, tmp_path / "local", cfg, workers=2, progress=False)
    remote = R.build_ray([tmp_path / "crawl"], tmp_path / "ray", cfg, progress=False)  # a folder of WARCs
    assert local["shards"] == remote["shards"] == 3
    assert _outputs(tmp_path / "ray") == _outputs(tmp_path / "local")
    assert _stats_wo_time(tmp_path / "ray") == _stats_wo_time(tmp_path / "local")


def test_shard_by_files_task_streams_its_file(tmp_path, monkeypatch):
    # the task body without Ray: it must hand records to the pool as it reads them, never hold
    # a whole input file (a 1 GB WARC) in memory
    warc = tmp_path / "crawl.warc.gz"
    make_test_warc(warc, n=40, seed=8, hang=False, crash=False)
    cfg = P.load_config(_cfg(tmp_path, read={"shard_by": "files"}))
    read = 0
    real_iter, real_imap = E.iter_records, E.IsolatedPool.imap
    lag: list[int] = []

    def counting_iter(paths, *args):
        nonlocal read
        for rec in real_iter(paths, *args):
            read += 1
            yield rec

    def watching_imap(self, items):
        for n, got in enumerate(real_imap(self, items), 1):
            lag.append(read - n)  # records read but not yet processed
            yield got

    monkeypatch.setattr(E, "iter_records", counting_iter)
    monkeypatch.setattr(E.IsolatedPool, "imap", watching_imap)
    plan = E.prepare_run([warc], tmp_path / "out", cfg)
    assert R._stage1_task(str(plan.out), 0, str(warc), cfg) == 0
    assert read > 40 and len(lag) == read
    assert max(lag) <= 2 * 8 + 1  # at most a batch in the worker and the next being gathered
    monkeypatch.undo()
    E.build([warc], tmp_path / "local", cfg, workers=1, progress=False)
    shard = Path(E.shard_name(0))
    for name in ("docs.jsonl", "keys.jsonl", "errors.jsonl", "excluded.jsonl"):
        got = (E.stage1_dir(plan.out) / shard / name).read_bytes()
        assert got == (E.stage1_dir(tmp_path / "local") / shard / name).read_bytes(), name


def test_a_retried_stage1_task_finds_its_shard_committed(tmp_path):
    # Ray retries a task whose worker died (max_retries): one that died after its commit (the
    # rename) ran again and renamed onto the committed shard: ENOTEMPTY failed the whole build
    warc = tmp_path / "crawl.warc.gz"
    make_test_warc(warc, n=10, seed=9, hang=False, crash=False)
    cfg = P.load_config(_cfg(tmp_path, read={"shard_by": "files"}))
    plan = E.prepare_run([warc], tmp_path / "out", cfg)
    assert R._stage1_task(str(plan.out), 0, str(warc), cfg) == 0
    shard = E.stage1_dir(plan.out) / E.shard_name(0)
    first = {p.name: p.read_bytes() for p in shard.iterdir()}
    assert R._stage1_task(str(plan.out), 0, str(warc), cfg) == 0  # the retry
    assert {p.name: p.read_bytes() for p in shard.iterdir()} == first
    assert sorted(p.name for p in E.stage1_dir(plan.out).iterdir()) == [E.shard_name(0)]  # no tmp left
