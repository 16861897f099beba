"""``interleaf eval``: run, score and make-mini sub-commands (cheap to import: work happens in handlers)."""

from __future__ import annotations

import argparse
import json
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="evaluate on MMIU, MM-NIAH, TVR-Ranking (official scoring)")
    sub = p.add_subparsers(dest="eval_command", metavar="EVAL_COMMAND")
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])

    r = sub.add_parser("run", help="run a model on a benchmark (crash-safe, resumable)")
    r.add_argument(
        "--model", required=True, help="checkpoint dir | hf:PATH (transformers) | openai:URL#MODEL"
    )
    r.add_argument("--bench", required=True, choices=["mmiu", "mmniah"])
    r.add_argument("--data", required=True, help="MMIU all.json/all.parquet/dir, or an MM-NIAH split dir")
    r.add_argument("-o", "--out", required=True, help="output directory (rerun with the same to resume)")
    r.add_argument("--limit", type=int, default=None, help="first N samples (MM-NIAH: per task)")
    r.add_argument("--batch-size", type=int, default=8)
    r.add_argument(
        "--max-new-tokens", type=int, default=None, help="default: MMIU 64, MM-NIAH 16 (32 counting)"
    )
    r.add_argument("--judge", default=None, help="MMIU answer-matching judge, openai:URL#MODEL")
    r.add_argument(
        "--image-root",
        default=None,
        help="image root (default: for MMIU the data directory, for MM-NIAH the split's images/)",
    )
    r.add_argument("--tasks", nargs="*", default=None, help="MM-NIAH tasks to run (default: all found)")
    r.add_argument("--device", default="cpu")
    r.add_argument("--concurrency", type=int, default=8, help="parallel requests for openai: models")
    r.add_argument("--timeout", type=float, default=60.0, help="seconds per endpoint request")
    r.add_argument("--retries", type=int, default=3, help="retries per endpoint request")
    r.add_argument("--no-progress", action="store_true")
    r.add_argument("--json", action="store_true", help="print the scores as JSON")
    r.set_defaults(func=_run)

    s = sub.add_parser("score", help="re-score saved predictions without a model")
    ssub = s.add_subparsers(dest="score_bench", metavar="BENCH")
    s.set_defaults(func=lambda a: (s.print_help(), 2)[1])
    sm = ssub.add_parser("mmiu", help="PRED.jsonl: MMIU records plus 'response'")
    sm.add_argument("pred")
    sm.add_argument("--judge", default=None, help="openai:URL#MODEL for non-letter answers")
    sm.add_argument("--json", action="store_true")
    sm.set_defaults(func=_score_mmiu)
    sn = ssub.add_parser("mmniah", help="official result files <model>_<task>-<split>.jsonl")
    sn.add_argument("results", nargs="+", help="result files, or directories holding them")
    sn.add_argument("--json", action="store_true")
    sn.add_argument("--official", action="store_true", help="print the official scores_<split>.json content")
    sn.set_defaults(func=_score_mmniah)
    st = ssub.add_parser("tvr-ranking", help="NDCG@K, IoU > mu (official)")
    st.add_argument("--gt", required=True, help="official split JSON (val.json / test.json)")
    st.add_argument("--pred", required=True, help="{query_id: [{video_name, timestamp, model_scores}, ...]}")
    st.add_argument("--k", type=int, nargs="+", default=[10, 20, 40])
    st.add_argument("--mu", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    st.add_argument("--inclusive", action="store_true", help="IoU >= mu (the paper) instead of > (the code)")
    st.add_argument("--missing", choices=["skip", "zero"], default="skip", help="queries without predictions")
    st.add_argument(
        "--video-corpus", default=None, help="video_corpus.json: check the video names against it"
    )
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=_score_tvr)

    m = sub.add_parser("make-mini", help="write a small offline benchmark in the official format")
    m.add_argument("bench", choices=["mmiu", "mmniah"])
    m.add_argument("-o", "--out", required=True)
    m.add_argument("--per-task", type=int, default=None, help="samples per task")
    m.add_argument("--seed", type=int, default=0)
    m.set_defaults(func=_make_mini)


def _print(obj: dict, as_json: bool) -> None:
    if as_json:
        json.dump(obj, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        from interleaf.eval.report import markdown

        sys.stdout.write(markdown(obj))


def _run(args: argparse.Namespace) -> int:
    from interleaf.errors import InputError, check_minimums
    from interleaf.eval.runner import run

    check_minimums(
        ("--limit", args.limit, 1),
        ("--batch-size", args.batch_size, 1),
        ("--max-new-tokens", args.max_new_tokens, 1),
        ("--concurrency", args.concurrency, 1),
        ("--retries", args.retries, 0),
    )
    if not args.timeout > 0:
        raise InputError(f"--timeout must be > 0, got {args.timeout}")
    scores = run(
        args.model,
        args.bench,
        args.data,
        args.out,
        limit=args.limit,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        judge=args.judge,
        image_root=args.image_root,
        tasks=args.tasks,
        device=args.device,
        concurrency=args.concurrency,
        timeout=args.timeout,
        retries=args.retries,
        progress=not args.no_progress,
    )
    counters = scores["run"]
    if counters["failed"] and not counters["cached"] and not counters["generated"]:
        errors = scores["errors"]["samples"]
        first = next((e["error"] for e in errors if e["error"].startswith("model error")), "model error")
        raise InputError(
            f"{args.model}: all {counters['failed']} requests failed ({first}); "
            f"{args.out} holds the errors, rerun to retry them"
        )
    if args.json:
        _print(scores, True)
    else:
        print(f"wrote {args.out}/predictions.jsonl, scores.json, report.md")
    if args.judge and args.bench == "mmiu":
        _check_judge(args.judge, scores, [scores["judge_error"]] if "judge_error" in scores else [])
    return 0


def _check_judge(spec: str, scores: dict, failures: list[str]) -> None:
    """Failed judge calls only showed as 'judge_error N' in the report: a mistyped judge URL looked
    like a scored run. All failed: an error (after the report); some: a one-line warning."""
    from interleaf.errors import InputError

    counts = scores.get("extraction_counts", {})
    failed, asked = counts.get("judge_error", 0), counts.get("judge_error", 0) + counts.get("judge", 0)
    if failed:
        first = f" (judge error: {failures[0]})" if failures else ""
        if failed == asked:
            raise InputError(
                f"{spec}: all {failed} judge calls failed{first}; those records are left out of the scores"
            )
        print(
            f"warning: {spec}: {failed} of {asked} judge calls failed{first}; "
            "those records are left out of the scores",
            file=sys.stderr,
        )


def _score_mmiu(args: argparse.Namespace) -> int:
    from interleaf.errors import InputError
    from interleaf.eval import mmiu
    from interleaf.eval.adapters import make_judge
    from interleaf.eval.mmniah import read_jsonl

    judge = make_judge(args.judge) if args.judge else None
    bad: list[dict] = []  # invalid JSON lines: skipped and reported with the unscorable records
    scores, _ = mmiu.score(read_jsonl(args.pred, bad), judge=judge)
    skipped = bad + scores["skipped"]["samples"]
    if not scores["num_scored"]:
        why = f" ({skipped[0]['id']}: {skipped[0]['error']})" if skipped else " (no records)"
        raise InputError(f"{args.pred}: no scorable record{why}")
    scores["skipped"] = {"count": len(bad) + scores["skipped"]["count"], "samples": skipped[:1000]}
    _print({"benchmark": "mmiu", "model": args.pred, **scores}, args.json)
    if args.judge:  # as eval run does for the model: the report first, then one line
        _check_judge(args.judge, scores, judge.failures)
    return 0


def _score_mmniah(args: argparse.Namespace) -> int:
    from pathlib import Path

    from interleaf.errors import InputError
    from interleaf.eval import mmniah

    files = []
    for r in args.results:
        if Path(r).is_dir():
            found = sorted(Path(r).glob("*.jsonl"))
            if not found:
                raise InputError(f"{r}: no result files (<model>_<task>-<split>.jsonl) in this directory")
            files += found
        elif Path(r).exists():
            files.append(Path(r))
        else:
            raise InputError(f"{r}: no such file or directory")
    if args.official:
        grouped = mmniah.collect(files)
        _print(
            {m: {sp: mmniah.official_scores_json(ts) for sp, ts in d.items()} for m, d in grouped.items()},
            True,
        )
        return 0
    res = mmniah.score_files(files)
    if args.json:
        _print(res, True)
    else:
        from interleaf.eval.report import markdown

        for model, splits in res.items():
            for split, summary in splits.items():
                sys.stdout.write(markdown({"benchmark": "mmniah", "model": model, "split": split, **summary}))
    return 0


def _score_tvr(args: argparse.Namespace) -> int:
    from interleaf.errors import InputError
    from interleaf.eval import tvr

    if min(args.k) < 1:
        raise InputError(f"--k must be >= 1, got {min(args.k)}")
    if not all(0 <= mu <= 1 for mu in args.mu):
        raise InputError(f"--mu must be IoU thresholds in [0, 1], got {' '.join(map(str, args.mu))}")
    gt, pred = tvr.load_split(args.gt), tvr.load_predictions(args.pred)
    if args.video_corpus:
        tvr.check_videos(gt, pred, tvr.load_video_corpus(args.video_corpus))
    res = tvr.ndcg_iou(
        gt,
        pred,
        ks=tuple(args.k),
        mus=tuple(args.mu),
        inclusive=args.inclusive,
        missing=args.missing,
    )
    if args.json:
        _print(res, True)
    else:
        for k, d in res.items():
            print(k, " ".join(f"IoU{'>=' if args.inclusive else '>'}{mu}: {v:.4f}" for mu, v in d.items()))
    return 0


def _make_mini(args: argparse.Namespace) -> int:
    from interleaf.eval import mini

    if args.bench == "mmiu":
        path = mini.make_mini_mmiu(args.out, per_task=args.per_task or 4, seed=args.seed)
    else:
        path = mini.make_mini_mmniah(args.out, per_task=args.per_task or 6, seed=args.seed)
    print(f"wrote {path}")
    return 0
