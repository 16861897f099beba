"""Human-readable outputs: a markdown report and the MM-NIAH length x depth heatmaps (PNG)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from interleaf.eval import mmniah


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def markdown(scores: dict[str, Any], heatmaps: bool = False) -> str:
    """A markdown report of an ``eval run`` (or ``eval score``) result.

    ``heatmaps``: link the MM-NIAH ``heatmaps/<task>.png`` that ``eval run`` writes next to its
    report (``eval score`` prints the report and writes no heatmaps: no links to missing files).
    """
    bench = scores.get("benchmark")
    lines = [f"# {bench} - {scores.get('model', 'model')}", ""]
    if "num_samples" in scores:
        run = scores.get("run", {})
        lines.append(
            f"{scores['num_samples']} samples; {run.get('generated', 0)} answered now, "
            f"{run.get('cached', 0)} from the response store, {run.get('failed', 0)} failed."
        )
    errors = scores.get("errors") or {}
    if errors.get("count"):
        kinds = ", ".join(f"{k}: {v}" for k, v in sorted(errors["by_kind"].items()))
        lines.append(f"**{errors['count']} samples with errors** ({kinds}); see scores.json `errors`.")
    for note in scores.get("adapter_notes", []):
        lines.append(f"Note: {note}.")
    lines.append("")
    if bench == "mmiu":
        lines += _mmiu_markdown(scores)
    elif bench == "mmniah":
        lines += _mmniah_markdown(scores, heatmaps)
    return "\n".join(lines) + "\n"


def _mmiu_markdown(s: dict) -> list[str]:
    if "overall" not in s:
        return ["No scorable samples."]
    b = s.get("baselines", {})
    lines = [
        f"Extraction: {s['extraction']} ({', '.join(f'{k} {v}' for k, v in sorted(s['extraction_counts'].items()))}).",
        f"Unparsable responses (no option found): {s.get('unparsable', 0)}.",
    ]
    if s.get("skipped", {}).get("count"):
        lines.append(f"**{s['skipped']['count']} records could not be scored**; see `skipped`.")
    lines += [
        "",
        "| metric | accuracy (%) |",
        "|---|---|",
        f"| Overall (mean over {s['num_tasks']} tasks, official) | {_pct(s['overall'])} |",
        f"| Overall (paper's 52-task grouping) | {_pct(s['overall_paper_tasks'])} |",
        f"| Micro accuracy ({s['num_scored']} questions) | {_pct(s['micro_accuracy'])} |",
        f"| Random-guess baseline | {_pct(b.get('random'))} |",
        f"| Frequency-guess baseline | {_pct(b.get('frequency'))} |",
        "",
        "| relationship | tasks | questions | accuracy (%) | micro (%) |",
        "|---|---|---|---|---|",
    ]
    for rel, r in s["per_relationship"].items():
        lines.append(
            f"| {rel} | {r['tasks']} | {r['count']} | {_pct(r['accuracy'])} | {_pct(r['micro_accuracy'])} |"
        )
    lines += ["", "| task | questions | accuracy (%) | unparsable |", "|---|---|---|---|"]
    for task, t in s["per_task"].items():
        lines.append(f"| {task} | {t['count']} | {_pct(t['accuracy'])} | {t.get('unparsable', 0)} |")
    return lines


def _mmniah_markdown(s: dict, heatmaps: bool) -> list[str]:
    head = "| task | " + " | ".join(mmniah.CONTEXT_RANGES) + " | Overall | unparsable |"
    lines = [
        f"Split: {s.get('split', '?')}. Scores (%) per context-length bin, official MM-NIAH scorer.",
        f"Unparsable responses: {s.get('unparsable', 0)} (multiple choice: no option letter; counting: "
        "no JSON list; open short answers: n/a).",
    ]
    skipped = sum(t.get("skipped", {}).get("count", 0) for t in s.get("tasks", {}).values())
    if skipped:
        lines.append(f"**{skipped} records could not be scored** (see `skipped` per task).")
    lines += ["", head, "|---" * (len(mmniah.CONTEXT_RANGES) + 3) + "|"]
    rows = list(s.get("tasks", {}).items())
    if "overall" in s:
        rows.append(("**Overall**", {**s["overall"], "unparsable": s.get("unparsable")}))
    for name, t in rows:
        cells = " | ".join(_pct(v) for v in t["scores"])
        unparsable = "n/a" if t.get("unparsable") is None else t["unparsable"]
        lines.append(f"| {name} | {cells} | {_pct(t['overall'])} | {unparsable} |")
    if "overall" not in s:
        lines += ["", "Benchmark overall needs all six tasks."]
    heat = [t for t in s.get("tasks", {})] if heatmaps else []
    if heat:
        lines += ["", "Length x depth heatmaps:", ""]
        lines += [f"![{t}](heatmaps/{t}.png)" for t in heat]
    return lines


def mmniah_heatmaps(task_scores: list[mmniah.TaskScore], out_dir: str | os.PathLike) -> list[Path]:
    """One PNG per task: rows = needle depth 0..1 (0.2 steps), columns = context-length bins.

    Red -> gold -> green over [0, 1], as the official figures.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import LinearSegmentedColormap

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cmap = LinearSegmentedColormap.from_list("mmniah", ["#DC143C", "#FFD700", "#3CB371"], N=100)
    paths = []
    for ts in task_scores:
        data = np.array(ts.grid).T  # [5 depth, 11 length]
        fig, ax = plt.subplots(figsize=(8, 4))
        ax.imshow(data, cmap=cmap, vmin=0, vmax=1, aspect="auto", origin="upper")
        ax.set_xticks(range(len(mmniah.CONTEXT_RANGES)), mmniah.CONTEXT_RANGES, rotation=45)
        ax.set_yticks(
            np.arange(-0.5, mmniah.N_DEPTH, 1),
            [f"{j * mmniah.DEPTH_INTERVAL:.1f}" for j in range(mmniah.N_DEPTH + 1)],
        )
        ax.set_xlabel("context length")
        ax.set_ylabel("needle depth")
        ax.set_title(f"{ts.model} {ts.task}-{ts.split} (overall {100 * ts.overall:.1f})")
        for (y, x), v in np.ndenumerate(data):
            if ts.counts[x][y]:
                ax.text(x, y, f"{100 * v:.0f}", ha="center", va="center", fontsize=7)
        path = out / f"{ts.task}.png"
        fig.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(fig)
        paths.append(path)
    return paths
