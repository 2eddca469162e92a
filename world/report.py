"""The report folder of a world run: ``report.md`` (results beside chance), ``samples.png``, ``loss_curves.png``,
``text2image.png``; ``OUT/results.json`` holds every number."""

from __future__ import annotations

import json
import os
import platform
import shutil
from pathlib import Path

import numpy as np


def _loss_curves(out: Path, path: Path) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (
        ("stage1", "stage 1"),
        ("grounding", "stage 2, yes/no warm-up"),
        ("stage2", "stage 2"),
        ("stage3", "stage 3"),
    )
    fig, axes = plt.subplots(1, len(panels), figsize=(16, 3.2))
    finals = {}
    for (name, title), ax in zip(panels, axes):
        done = out / name / "done.json"
        history = json.loads(done.read_text())["info"]["log_history"] if done.is_file() else []
        keys = sorted({key for h in history for key in h if key.startswith("loss") and key != "loss"} | {"loss"})
        for key in keys:
            points = [(h["step"], h[key]) for h in history if key in h and isinstance(h[key], (int, float))]
            if points:
                ax.plot(*zip(*points), label=key)
                finals[f"{name}_{key}"] = {"first": points[0][1], "last": points[-1][1]}
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return finals


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f} %"


def write_report(out: Path, folder: Path, run, times: dict) -> dict:
    m = json.loads((out / "evaluation" / "metrics.json").read_text())
    losses = _loss_curves(out, folder / "loss_curves.png")
    for name in ("samples.png", "text2image.png"):
        if (out / "evaluation" / name).is_file():
            shutil.copy2(out / "evaluation" / name, folder / name)
    rows = []
    yn = m["stage2_yes_no"]

    def acc_f1(r, mode):  # deem.evaluation reports percentages
        return f"{r[mode]['accuracy']:.1f} % / {r[mode]['f1']:.1f} %" if mode in r else "not run"

    for split in ("random", "popular", "adversarial"):
        r = yn[f"pope_{split}"]
        rows.append(
            (
                f"POPE-style {split}: accuracy / F1, scored; generated (stage 2)",
                f"{acc_f1(r, 'score')}; {acc_f1(r, 'generate')}",
                "50 %",
            )
        )
    for key, name in (("robustvqa_in", "in-distribution"), ("robustvqa_ood", "out-of-distribution renditions")):
        r = yn[key]
        generated = f"{r['generate']['accuracy']:.1f} %" if "generate" in r else "not run"
        rows.append(
            (
                f"RobustVQA-style yes/no, {name}: scored / generated (stage 2)",
                f"{r['score']['accuracy']:.1f} % / {generated}",
                "50 %",
            )
        )
    coco = m["stage2_coco_caption"]["generate"]
    rows.append(
        (
            "caption CIDEr, deem.evaluation coco-caption prompt (stage 2)",
            f"{coco.get('cider', float('nan')) / 100:.3f}",
            "",
        )
    )
    c = m["stage2_caption"]
    rows.append(
        (
            "caption CIDEr, the training prompt (stage 2)",
            f"{c['cider']:.3f}",
            f"{c['cider_random_caption']:.3f} (another image's caption)",
        )
    )
    d = m["stage1_draw"]
    drawn = f", {d['n']} drawings"
    rows.append(
        (
            f"text-to-image: drawn colour as asked (stage 1{drawn})",
            _pct(d["colour_accuracy"]),
            _pct(d["colour_chance"]),
        )
    )
    rows.append(
        (f"text-to-image: drawn shape as asked (stage 1{drawn})", _pct(d["shape_accuracy"]), _pct(d["shape_chance"]))
    )
    s = m["stage1_stories"]
    rows.append(
        ("interleaved stories: image colour matches the text before it", _pct(s["colour_matches_text"]), _pct(1 / 6))
    )
    rows.append(
        (
            "`<|startofimage|>` within 3 greedy tokens after a describing sentence",
            f"{_pct(m['stage1_soi']['soi_within_3_tokens'])} (stage 1)",
            f"{_pct(m['assembled_soi']['soi_within_3_tokens'])} (assembled, before stage 1)",
        )
    )
    if "soi_probability_next" in m["stage1_soi"]:
        rows.append(
            (
                "P(`<|startofimage|>` next) right after a describing sentence",
                f"{_pct(m['stage1_soi']['soi_probability_next'])} (stage 1)",
                f"{_pct(m['assembled_soi']['soi_probability_next'])} (assembled, before stage 1)",
            )
        )
    g = m["stage3_region"]
    rows.append(
        (
            "region captions (stage 3): colour / shape named right",
            f"{_pct(g['colour_accuracy'])} / {_pct(g['shape_accuracy'])}",
            f"{_pct(1 / 6)} / {_pct(1 / 4)}",
        )
    )
    ref = m["stage3_refcocog"]["generate"]
    rows.append(
        (
            "region caption CIDEr, deem.evaluation refcocog-region-caption (stage 3)",
            f"{ref.get('cider', float('nan')) / 100:.3f}",
            "",
        )
    )
    lines = [
        "# DEEM on the built-in world",
        "",
        f"Run: {'--quick' if run.quick else 'default'}, seed {run.seed}, device {run.device}; stage steps "
        f"{run.stage1_steps} / {run.grounding_steps} + {run.stage2_steps} / {run.stage3_steps}; "
        f"{os.cpu_count()} CPU cores, "
        f"load average at the end {', '.join(f'{x:.1f}' for x in os.getloadavg())} ({platform.machine()}).",
        "",
        "| measure | result | chance / baseline |",
        "|---|---|---|",
        *[f"| {a} | {b} | {c} |" for a, b, c in rows],
        "",
        "Phase times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()),
        "",
        "![samples](samples.png)",
        "",
        "![losses](loss_curves.png)",
        "",
        "Caption examples (stage 2): "
        + "; ".join(f"'{e['generated']}' (ref. '{e['reference']}')" for e in c["examples"][:3]),
        "",
    ]
    ablation = out / "ablation" / "done.json"
    if ablation.is_file():
        table = json.loads(ablation.read_text())["info"]["rows"]
        lines += [
            "## Stage 1 with and without L_CSR (then the same stage 2)",
            "",
            "| L_CSR weight | in-dist. yes/no | OOD yes/no | seeds |",
            "|---|---|---|---|",
        ]
        summary = {}
        for w in sorted({r["csr_weight"] for r in table}, reverse=True):
            sel = [r for r in table if r["csr_weight"] == w]
            ins, ood = np.array([r["robustvqa_in"] for r in sel]), np.array([r["robustvqa_ood"] for r in sel])
            summary[str(w)] = {
                "in_mean": float(ins.mean()),
                "in_std": float(ins.std()),
                "ood_mean": float(ood.mean()),
                "ood_std": float(ood.std()),
                "seeds": len(sel),
            }
            cells = [f"{100 * a.mean():.1f} ± {100 * a.std():.1f} %" for a in (ins, ood)]
            lines.append(f"| {w:g} | {cells[0]} | {cells[1]} | {len(sel)} |")
        m["ablation"] = {"rows": table, "summary": summary}
        lines.append("")
    tmp = folder / ".report.md.tmp"
    tmp.write_text("\n".join(lines))
    tmp.replace(folder / "report.md")
    results = {"metrics": m, "losses": losses, "phase_seconds": times, "run": {k: v for k, v in vars(run).items()}}
    tmp = out / ".results.json.tmp"
    tmp.write_text(json.dumps(results, indent=2, default=str))
    tmp.replace(out / "results.json")
    return {"report": str(folder / "report.md")}
