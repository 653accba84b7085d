"""The paper's result tables from training workdirs and robustness.json files.

    python tools/report.py runs/t1_* --out report
    python tools/report.py --glob 'runs/*' --robustness rob/robustness.json --out report

Distillation runs (``summary.json`` + ``config.json`` of ``python -m l2s_jax.main``) become rows of
the layout of Tables 1-5, 10 and 11: teacher, type, kernel size, student, method, epochs, teacher /
student (baseline) / distilled top-1, Effective Gain (x100) and Direct Gain, with the paper's
numbers beside them when the run is one of ``configs/paper.py``'s experiments (same student,
teacher, method, feature stages, epochs and recipe). CIFAR fine-tuning runs (``config.data.name``
cifar10 / cifar100, ``result.json``) go to the Table-12 layout; ``--robustness`` files are merged
into the Table-7 layout. Outputs in ``--out``: ``report.md``, ``report.csv`` and ``direct_gain.png``
(Direct Gain per teacher, one bar group per table and student).
"""
from __future__ import annotations

import argparse
import csv
import functools
import glob
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from l2s_jax import evaluate

REPO_ROOT = Path(__file__).resolve().parents[1]
TRANSFORMERS = ("vit", "swin", "cswin")
COLUMNS = ("table", "teacher", "type", "kernel size", "student", "method", "epochs", "teacher top-1",
           "student top-1", "distilled top-1", "Effective Gain", "Direct Gain", "paper distilled top-1",
           "paper Direct Gain", "run")


def _read(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


@functools.lru_cache(maxsize=1)
def paper_experiments() -> dict[tuple, dict[str, Any]]:
    """configs/paper.py's experiments keyed by (student, teacher, method, stages, epochs, optimizer)."""
    path = REPO_ROOT / "configs" / "paper.py"
    if not path.is_file():
        return {}
    spec = importlib.util.spec_from_file_location("_l2s_paper_cfg", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = {}
    for arg in module.experiments():
        c = module.get_config(arg)
        table = int(arg.split(",")[0].split("=")[1])
        out[_signature(json.loads(c.to_json_best_effort()))] = {"table": table, "arg": arg, **c.paper.to_dict()}
    return out


def _signature(config: Mapping[str, Any]) -> tuple:
    method = config["distill"]["method"]
    stages = config["distill"]["fd_stages"] if method.startswith("fd") else 1
    teacher = config["teacher"]["model"] if method != "ce" else None
    return (config["model"]["name"], teacher, method, stages, float(config["epochs"]), config["optim"]["name"])


def teacher_kind(config: Mapping[str, Any]) -> tuple[str, str]:
    """(type, kernel size) of the run's teacher: Transformer / CNN and its largest conv kernel."""
    from l2s_jax.models import pretrained, registry

    t = config["teacher"]
    trained = t.get("train") or {}
    name = (trained.get("model") or {}).get("name") or t.get("model") or ""
    family, kwargs = registry.MODELS.get(name, (name, {}))
    kwargs = {**kwargs, **((trained.get("model") or {}).get("overrides") or {})}
    if (Path(t.get("checkpoint") or "/nonexistent") / pretrained.SPEC_FILE).is_file():
        spec = json.loads((Path(t["checkpoint"]) / pretrained.SPEC_FILE).read_text())
        family, kwargs = spec.get("family", family), {**kwargs, **spec.get("config", {})}
    if family in TRANSFORMERS:
        return "Transformer", "-"
    if family == "slak":
        k = int(kwargs.get("kernel_size", [7])[0])
        return "CNN", f"{k}x{k}"
    return "CNN", {"convnext": "7x7", "resnet": "3x3", "mobilenetv3": "3x3/5x5"}.get(family, "?")


def _fmt(v: Any) -> str:
    return "-" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v)


def distillation_row(run: Path, summary: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, Any]:
    """One row of the Tables 1-5/10/11 layout."""
    paper = paper_experiments().get(_signature(config))
    teacher_top1, base, dist = summary.get("teacher_top1"), summary.get("baseline_top1"), summary["distilled_top1"]
    direct = None if base is None else dist - base
    effective = None if direct is None or not teacher_top1 else 100.0 * direct / teacher_top1
    p_direct = None
    if paper and paper.get("student_top1") is not None and paper.get("distilled_top1") is not None:
        p_direct = paper["distilled_top1"] - paper["student_top1"]
    kind, kernel = teacher_kind(config)
    epochs = config["epochs"] if not config.get("total_steps") else f"{config['total_steps']} steps"
    return {"table": paper["table"] if paper else "-", "teacher": config["teacher"]["name"], "type": kind,
            "kernel size": kernel, "student": config["model"].get("label") or config["model"]["name"],
            "method": config["distill"]["method"].upper(), "epochs": epochs, "teacher top-1": teacher_top1,
            "student top-1": base, "distilled top-1": dist, "Effective Gain": effective, "Direct Gain": direct,
            "paper distilled top-1": paper.get("distilled_top1") if paper else None,
            "paper Direct Gain": p_direct, "run": str(run)}


def collect(runs: Sequence[Path]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(distillation rows, CIFAR rows) of the given workdirs; a folder that is neither is an error."""
    rows, cifar = [], []
    for run in runs:
        config = _read(run / "config.json")
        if config is None:
            raise FileNotFoundError(f"{run} is not a training workdir (no config.json)")
        dataset = config["data"]["name"]
        summary, result = _read(run / "summary.json"), _read(run / "result.json")
        if dataset in ("cifar10", "cifar100"):
            if result is None:
                raise FileNotFoundError(f"{run}: CIFAR run without result.json (not finished)")
            cifar.append({"model": config["model"].get("label") or config["model"]["name"],
                          "init": config.get("init", "") or "-", "dataset": dataset, "top1": result["top1"],
                          "run": str(run)})
        elif summary is None:
            raise FileNotFoundError(f"{run}: no summary.json (the run has not finished)")
        elif summary.get("method") != "ce":
            rows.append(distillation_row(run, summary, config))
    return rows, cifar


def cifar_table(cifar: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Table 12: one row per (model, init), CIFAR-10 and CIFAR-100 top-1."""
    merged: dict[tuple, dict[str, float]] = {}
    for r in cifar:
        merged.setdefault((r["model"], r["init"]), {})[r["dataset"]] = r["top1"]
    rows = [[m, i, _fmt(v.get("cifar10")), _fmt(v.get("cifar100"))] for (m, i), v in merged.items()]
    return ["model", "initialised from", "CIFAR-10", "CIFAR-100"], rows


def merge_robustness(files: Sequence[Path]) -> dict[str, Any]:
    """The models of several robustness.json files (a name used twice is an error)."""
    models: dict[str, Any] = {}
    for f in files:
        data = _read(f)
        if data is None or "models" not in data:
            raise FileNotFoundError(f"{f} is not a robustness.json written by tools/evaluate.py")
        for name, m in data["models"].items():
            if name in models:
                raise ValueError(f"model {name!r} appears in two robustness files (rename one with NAME=DIR)")
            models[name] = m
    return models


def plot_direct_gain(rows: Sequence[Mapping[str, Any]], path: Path) -> None:
    """Direct Gain per teacher (x axis), one bar per series (table, student, method); paper bars hatched."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    teachers = list(dict.fromkeys(f"{r['teacher']}\n{r['type']} {r['kernel size']}" for r in rows))
    series: dict[str, dict[str, Mapping[str, Any]]] = {}
    for r in rows:
        label = (f"T{r['table']} " if r["table"] != "-" else "") + f"{r['student']} {r['method']}"
        series.setdefault(label, {})[f"{r['teacher']}\n{r['type']} {r['kernel size']}"] = r
    with_paper = any(r["paper Direct Gain"] is not None for r in rows)
    bars = [(name, key) for name in series for key in (("Direct Gain", "paper Direct Gain") if with_paper
                                                         else ("Direct Gain",))]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(teachers) * max(len(bars), 1) ** 0.5 + 2), 4))
    width = 0.8 / max(len(bars), 1)
    x = np.arange(len(teachers))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    names = list(series)
    for i, (name, key) in enumerate(bars):
        vals = np.array([np.nan if series[name].get(t, {}).get(key) is None else series[name][t][key]
                         for t in teachers])
        pos = x + (i - (len(bars) - 1) / 2) * width
        paper = key.startswith("paper")
        ax.bar(pos, vals, width, color=colors[names.index(name) % len(colors)], alpha=0.45 if paper else 1.0,
               hatch="//" if paper else None, label=f"{name} (paper)" if paper else name)
        for xi, v in zip(pos, vals):
            if not np.isnan(v):
                ax.annotate(f"{v:+.2f}", (xi, v), ha="center", va="bottom" if v >= 0 else "top", fontsize=7)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(x, teachers, fontsize=8)
    ax.set_xlabel("teacher")
    ax.set_ylabel("Direct Gain (top-1 points)")
    ax.set_title("Direct Gain over the CE baseline per teacher", fontsize=10)
    if rows:
        ax.legend(fontsize=7)
        ax.margins(y=0.15)
    else:
        ax.text(0.5, 0.5, "no distillation runs", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(rows: Sequence[Mapping[str, Any]], cifar: Sequence[Mapping[str, Any]],
                 robustness: Mapping[str, Any], out: Path) -> dict[str, Path]:
    """report.md, report.csv and direct_gain.png in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"md": out / "report.md", "csv": out / "report.csv", "png": out / "direct_gain.png"}
    rows = sorted(rows, key=lambda r: (str(r["table"]), r["student"], r["method"], r["teacher"]))
    body = [[_fmt(r[c]) for c in COLUMNS] for r in rows]
    md = ["# Results (layout of Tables 1-5, 10, 11; top-1 %, Effective Gain x100)", "",
          evaluate.markdown_table(COLUMNS, body)]
    c_head, c_rows = cifar_table(cifar)
    r_head = ["model"] + [h for h, _ in evaluate.TABLE7_COLUMNS]
    r_rows = evaluate.table7_rows(robustness)
    if c_rows:
        md += ["", "## Transfer to CIFAR (Table 12 layout, top-1 %)", "", evaluate.markdown_table(c_head, c_rows)]
    if r_rows:
        md += ["", "## Robustness (Table 7 layout; C = mCE, lower is better)", "",
               evaluate.markdown_table(r_head, r_rows)]
    paths["md"].write_text("\n".join(md) + "\n")
    with paths["csv"].open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        w.writerows(body)
        for head, extra in ((c_head, c_rows), (r_head, r_rows)):
            if extra:
                w.writerow([])
                w.writerow(head)
                w.writerows(extra)
    plot_direct_gain(rows, paths["png"])
    return paths


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="*", help="training workdirs (python -m l2s_jax.main --workdir)")
    p.add_argument("--glob", action="append", default=[], help="workdir pattern, e.g. 'runs/*' (quote it)")
    p.add_argument("--robustness", action="append", default=[], metavar="FILE",
                   help="robustness.json of tools/evaluate.py (repeatable)")
    p.add_argument("--out", required=True, help="output folder")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point; one-line error and exit status 2 on bad input."""
    args = build_parser().parse_args(argv)
    try:
        runs = [Path(r) for r in args.runs]
        for pattern in args.glob:
            found = sorted(Path(p) for p in glob.glob(pattern) if Path(p, "config.json").is_file())
            if not found:
                raise FileNotFoundError(f"--glob {pattern!r} matches no training workdir (folder with config.json)")
            runs += found
        if not runs and not args.robustness:
            raise ValueError("give training workdirs (RUN_DIR... or --glob) and/or --robustness FILE")
        out = Path(args.out)
        if (out / "report.md").exists():
            raise FileExistsError(f"{out / 'report.md'} exists; choose another --out (nothing is overwritten)")
        rows, cifar = collect(runs)
        robustness = merge_robustness([Path(f) for f in args.robustness])
        paths = write_report(rows, cifar, robustness, out)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(paths["md"].read_text())
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
