"""`dist-lowrank report RUN_DIR`: what a run saved, from its own logs, as Markdown, JSON and PNG plots.

Every number comes from RUN_DIR/events.jsonl (written by rank 0 during training, by `dist-lowrank train`
or by the library API's `lowrank.logging`): parameter counts (all and trainable), measured communication
per step (our counter) beside the analytic model, throughput medians per phase (log windows end at every
change of shapes; in older logs a window that contains one is left out), the switch step and its cost,
per-layer ranks.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any, Optional

from dist_lowrank.errors import DistLowRankError


class ReportError(DistLowRankError):
    """The run directory cannot be reported on (missing, empty or partial); the message says which."""


def load_events(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir)
    if not path.is_dir():
        raise ReportError(f"{path}: not a directory")
    events_file = path / "events.jsonl"
    if not events_file.exists():
        raise ReportError(f"{events_file}: missing — is {path} a run directory (`dist-lowrank train` out_dir, "
                          "or lowrank.logging.out_dir)?")
    events = []
    for number, line in enumerate(events_file.read_text().splitlines(), 1):
        if line.strip():
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ReportError(f"{events_file}:{number}: not JSON ({exc.msg}); the run may have been killed "
                                  "while writing") from None
    if not any(e.get("event") == "summary" for e in events):
        raise ReportError(f"{events_file}: no summary record — the run did not finish")
    return events


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def build_report(events: list[dict[str, Any]]) -> dict[str, Any]:
    """The report as plain data (the JSON file); Markdown and plots are drawn from it."""
    summary = next(e for e in events if e["event"] == "summary")
    changes = [e for e in events if e["event"] in ("switch", "grow", "fix")]
    change_steps = [e["step"] for e in changes if e.get("ranks")]
    trains = [e for e in events if e["event"] == "train"]
    models = [e for e in events if e["event"] == "comm_model"]
    config = next((e for e in events if e["event"] == "config"), {})
    log_every = config.get("log_every") or (config.get("run") or {}).get("log_every", 1)

    def clean(record: dict) -> bool:  # a window with a change strictly inside it is not steady state
        steps = record.get("window_steps", log_every)
        return not any(record["step"] - steps < s < record["step"] for s in change_steps)

    phases: dict[str, dict[str, Any]] = {}
    for record in trains:
        entry = phases.setdefault(record["phase"], {"samples_per_sec": [], "tokens_per_sec": [], "step_time": [],
                                                    "comm": {}, "params": record["params"],
                                                    "trainable_params": record.get("trainable_params")})
        if clean(record):
            for key in ("samples_per_sec", "tokens_per_sec", "step_time"):
                if record.get(key) is not None:
                    entry[key].append(record[key])
            for op, value in record.get("comm_bytes_per_step", {}).items():
                entry["comm"].setdefault(op, []).append(value)
    per_phase = {}
    for name, entry in phases.items():
        analytic = next((m["expected"] for m in models if m["phase"] == name), {})
        measured = {op: _median(v) for op, v in entry["comm"].items()}
        per_phase[name] = {
            "params": entry["params"], "trainable_params": entry["trainable_params"],
            "samples_per_sec": _median(entry["samples_per_sec"]), "tokens_per_sec": _median(entry["tokens_per_sec"]),
            "step_time": _median(entry["step_time"]),
            "comm_bytes_per_step_measured": measured, "comm_bytes_per_step_analytic": analytic,
            "comm_measured_total": sum(v for v in measured.values() if v is not None),
            "comm_analytic_total": sum(analytic.values()),
        }
    switch = next((e for e in changes if e["event"] == "switch" and e.get("ranks")), None)
    layers = []
    if switch is not None:
        dims = switch.get("dims", {})
        for name in sorted(switch.get("reasons", {}) or switch["ranks"]):
            m, n = dims.get(name, (None, None))
            rank = switch["ranks"].get(name)
            before = m * n if m else None
            after = (rank * (m + n) if rank else before) if m else None
            layers.append({"layer": name, "shape": [m, n] if m else None, "rank": rank, "params_before": before,
                           "params_after": after, "reason": switch.get("reasons", {}).get(name, "")})
    full, low = per_phase.get("full", {}), per_phase.get("low", {})

    def ratio(a, b):
        return a / b if a and b else None

    estimates = [e for e in events if e["event"] == "estimate"]
    return {
        "end_to_end_vs_own_full_pace": _own_pace_speedup(summary, full),
        "summary": {k: summary.get(k) for k in ("task", "backend", "world_size", "strategy", "steps",
                                                 "wall_seconds", "switch_step", "params_full", "params_final",
                                                 "trainable_params_full", "trainable_params_final", "final_eval")},
        "compression": ratio(summary["params_full"], summary["params_final"]),
        "trainable_compression": ratio(summary.get("trainable_params_full"), summary.get("trainable_params_final")),
        "phases": per_phase,
        "comm_full_over_low": ratio(full.get("comm_measured_total"), low.get("comm_measured_total")),
        "throughput_low_over_full": ratio(low.get("samples_per_sec"), full.get("samples_per_sec")),
        "switch": None if switch is None else {"step": switch["step"], "ranks": switch["ranks"],
                                               "cost": switch.get("measurements", {})},
        "layers": layers,
        "srank_trajectories": {name: [[e["step"], e["sranks"][name]] for e in estimates]
                               for name in (estimates[0]["sranks"] if estimates else {})},
        "changes": [{"step": e["step"], "event": e["event"], "ranks": e.get("ranks", {})} for e in changes],
        "rank_trajectories": _rank_trajectories(events),
        "integrator_bytes": [[e["step"], e["integrator_bytes"]] for e in events
                             if e.get("event") == "rank_update" and e.get("integrator_bytes") is not None],
    }


def _rank_trajectories(events: list[dict[str, Any]]) -> dict[str, list[list[int]]]:
    """Per layer, [step, rank] at every logged change: switches, growths and every-step adaptations alike."""
    out: dict[str, list[list[int]]] = {}
    for e in events:
        if e.get("event") in ("switch", "grow", "fix", "rank_update"):
            for name, rank in (e.get("ranks") or {}).items():
                points = out.setdefault(name, [])
                if not points or points[-1][1] != rank:
                    points.append([e["step"], rank])
    return out


def _own_pace_speedup(summary: dict[str, Any], full: dict[str, Any]) -> Optional[float]:
    """steps × the run's own full-rank step time / its training time: the end-to-end speed-up over training
    every step at the pre-switch pace. An estimate from one run (the full-rank phase is the reference); a
    separately run full-rank job (`make baseline`, tools/bench_end_to_end.py) is the measurement."""
    train_s = (summary.get("final_eval") or {}).get("train_s") or summary.get("wall_seconds")
    step_time, steps = full.get("step_time"), summary.get("steps")
    if not (train_s and step_time and steps) or summary.get("switch_step") is None:
        return None
    return steps * step_time / train_s


def _fmt(value: Any, digits: int = 0) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def render_markdown(report: dict[str, Any]) -> str:
    s = report["summary"]
    lines = [f"# dist-lowrank report — {s['task'] or 'user script'} on {s['backend']} × {s['world_size']}, "
             f"strategy {s['strategy']}", "",
             f"- steps {s['steps']}, wall {s['wall_seconds']:.1f} s, switch at step {_fmt(s['switch_step'])}",
             f"- trainable parameters {_fmt(s['trainable_params_full'])} → {_fmt(s['trainable_params_final'])} "
             f"({_fmt(report['trainable_compression'], 2)}× fewer)",
             f"- all parameters, frozen ones included {_fmt(s['params_full'])} → {_fmt(s['params_final'])} "
             f"(full / final {_fmt(report['compression'], 2)}×)",
             "- final evaluation: " + (", ".join(f"{k} {v:.4f}" for k, v in (s["final_eval"] or {}).items()
                                                 if k != "step") or "–"),
             f"- communication per step, full / low rank: {_fmt(report['comm_full_over_low'], 2)}×; "
             f"throughput low / full (after the switch vs before): {_fmt(report['throughput_low_over_full'], 2)}×",
             f"- end to end vs training every step at this run's full-rank pace: "
             f"{_fmt(report.get('end_to_end_vs_own_full_pace'), 2)}× (estimate; the measured comparison with a "
             f"full-rank run is tools/bench_end_to_end.py)", "",
             "## Per phase (medians over steady-state log windows)", "",
             "| phase | params | trainable | samples/s | tokens/s | step s | comm B/step measured | comm B/step analytic |",
             "|---|---|---|---|---|---|---|---|"]
    for name, p in report["phases"].items():
        lines.append(f"| {name} | {_fmt(p['params'])} | {_fmt(p.get('trainable_params'))} "
                     f"| {_fmt(p['samples_per_sec'], 1)} | {_fmt(p['tokens_per_sec'], 1)} "
                     f"| {_fmt(p['step_time'], 4)} | {_fmt(p['comm_measured_total'])} | {_fmt(p['comm_analytic_total'])} |")
    if report["layers"]:
        lines += ["", "## Layers at the switch", "", "| layer | shape | rank | params before | params after | why |",
                  "|---|---|---|---|---|---|"]
        for layer in report["layers"]:
            shape = "×".join(map(str, layer["shape"])) if layer["shape"] else "–"
            lines.append(f"| {layer['layer']} | {shape} | {_fmt(layer['rank'])} | {_fmt(layer['params_before'])} "
                         f"| {_fmt(layer['params_after'])} | {layer['reason']} |")
    if report["switch"]:
        cost = report["switch"]["cost"]
        step_time = report["phases"].get("full", {}).get("step_time")
        lines += ["", "## Switch cost (per rank)", "", "| rank | seconds | in steps | peak RSS MB | RSS rise during the switch MB |",
                  "|---|---|---|---|---|"]
        for rank, m in enumerate(cost.get("per_rank") or [cost]):
            steps = m.get("seconds") / step_time if step_time and m.get("seconds") is not None else None
            lines.append(f"| {rank} | {_fmt(m.get('seconds'), 3)} | {_fmt(steps, 1)} | {_fmt(m.get('peak_rss_mb'), 0)} "
                         f"| {_fmt(m.get('peak_rss_delta_mb'), 0)} |")
    trajectories = report.get("rank_trajectories") or {}
    if any(len(points) > 1 for points in trajectories.values()):
        lines += ["", "## Ranks over time (`ranks.png`)", "", "| layer | first | final | min | max | changes |",
                  "|---|---|---|---|---|---|"]
        for name, points in trajectories.items():
            ranks = [p[1] for p in points]
            lines.append(f"| {name} | {ranks[0]} (step {points[0][0]}) | {ranks[-1]} (step {points[-1][0]}) "
                         f"| {min(ranks)} | {max(ranks)} | {len(points) - 1} |")
        moved = report.get("integrator_bytes") or []
        if moved:
            lines += ["", f"Bytes the integrator itself sent per step (this rank): {_fmt(moved[0][1])} at step "
                          f"{moved[0][0]}, {_fmt(moved[-1][1])} at step {moved[-1][0]} (they follow the ranks)."]
    lines += ["", "Plots: `srank.png` (stable-rank trajectories, switch marked), `savings.png` (params and comm)"
              + (", `ranks.png` (rank per layer over the run)." if trajectories else ".")]
    return "\n".join(lines) + "\n"


def _save_per_layer(plt: Any, fig: Any, ax: Any, ylabel: str, title: str, path: Path) -> Path:
    """Label a per-layer curve plot over optimizer steps and write it."""
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def render_plots(report: dict[str, Any], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, points in report["srank_trajectories"].items():
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], marker=".", label=name)
    if report["switch"]:
        ax.axvline(report["switch"]["step"], color="k", linestyle="--", label="switch")
    paths.append(_save_per_layer(plt, fig, ax, "stable rank", "Stable rank per layer", out_dir / "srank.png"))

    trajectories = report.get("rank_trajectories") or {}
    if trajectories:
        last = max([p[0] for points in trajectories.values() for p in points] + [report["summary"]["steps"] or 0])
        fig, ax = plt.subplots(figsize=(7, 4))
        for name, points in trajectories.items():  # piecewise constant between logged changes
            ax.step([p[0] for p in points] + [last], [p[1] for p in points] + [points[-1][1]], where="post",
                    label=name)
        paths.append(_save_per_layer(plt, fig, ax, "rank", "Rank per layer", out_dir / "ranks.png"))

    phases = list(report["phases"])
    fig, (left, right) = plt.subplots(1, 2, figsize=(8, 3.5))
    left.bar(phases, [report["phases"][p]["params"] for p in phases], color="tab:blue")
    left.set_title("parameters")
    measured = [report["phases"][p]["comm_measured_total"] for p in phases]
    analytic = [report["phases"][p]["comm_analytic_total"] for p in phases]
    xs = range(len(phases))
    right.bar([x - 0.2 for x in xs], measured, width=0.4, label="measured")
    right.bar([x + 0.2 for x in xs], analytic, width=0.4, label="analytic")
    right.set_xticks(list(xs), phases)
    right.set_title("bytes sent per step per rank")
    right.legend(fontsize=8, loc="lower right", framealpha=0.9)
    fig.tight_layout()
    paths.append(out_dir / "savings.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    return paths


def write_report(run_dir: str | Path) -> dict[str, Any]:
    """Write report.json, report.md, srank.png and savings.png into RUN_DIR; returns the report."""
    out = Path(run_dir)
    report = build_report(load_events(out))
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(render_markdown(report))
    render_plots(report, out)
    return report
