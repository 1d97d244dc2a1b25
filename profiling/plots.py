"""PNG plots of the User-LLM vs TextPrompt report (matplotlib, Agg backend: no display needed).

One figure per quantity, against history length: ``tokens.png``, ``flops.png``, ``time.png``,
``memory.png`` and, when some run measured GPU energy, ``energy.png``. Log scales where the values span
orders of magnitude; timings carry min-max error bars over their repeats.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter, NullFormatter  # noqa: E402

STYLE = {"userllm": dict(color="#1f77b4", marker="o", label="User-LLM"),
         "textprompt": dict(color="#d62728", marker="s", label="TextPrompt")}


def _series(rows: list[dict], method: str, key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for r in rows:
        s = r.get(method)
        if s and s.get(key) is not None:
            xs.append(r["history_length"])
            ys.append(float(s[key]))
    return xs, ys


def _human(v: float, _pos=None) -> str:
    """Tick labels like 218M, 1.5G, 32, 0.5 (SI prefixes; no 10^x notation)."""
    if v == 0:
        return "0"
    for unit, f in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(v) >= f:
            return f"{v / f:.3g}{unit}"
    return f"{v:.3g}"


def _finish(ax, title: str, ylabel: str, xs: Sequence[int], log: bool | None = None) -> None:
    ax.set_title(title, fontsize=11)
    ax.set_xlabel("history length (events)")
    ax.set_ylabel(ylabel)
    if xs:
        ax.set_xticks(sorted(set(xs)))
    vals = [y for line in ax.get_lines() for y in line.get_ydata() if y and y > 0]
    if not ax.get_lines():
        ax.text(0.5, 0.5, "not measured in these runs", ha="center", va="center", transform=ax.transAxes,
                color="gray")
        ax.set_xticks([])
        ax.set_yticks([])
    if log is None:
        log = bool(vals) and max(vals) / min(vals) > 30
    elif log and (not vals or max(vals) / min(vals) < 10):
        # Within one decade a log axis shows no major tick labels at all: use a linear one.
        log = False
        ax.set_ylabel(ylabel.replace(" (log scale)", "").replace(", log scale", ""))
    if log:
        ax.set_yscale("log")
        ax.yaxis.set_minor_formatter(NullFormatter())
        if vals and max(vals) / min(vals) < 100:      # few decades: label some minor ticks too
            ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, p: _human(v) if str(int(v))[0] in "25" else ""))
    elif vals:
        ax.set_ylim(0, 1.1 * max(vals))   # counts start at 0, so near-equal values look near-equal
    ax.yaxis.set_major_formatter(FuncFormatter(_human))
    ax.grid(True, which="major", alpha=0.35)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)


def _plot_methods(ax, rows, key, scale=1.0, linestyle="-", suffix="", alpha=1.0, marker=None,
                  spread_key: str | None = None) -> list[int]:
    """One line per method of ``key`` against history length; with ``spread_key`` (a report spread dict:
    median/min/max/repeats) error bars span the repeats' min-max, and a single-repeat point is hollow."""
    xs_all = []
    for m, st in STYLE.items():
        xs, ys = _series(rows, m, key)
        if not xs:
            continue
        extra = {"marker": marker, "markersize": 10, "markeredgewidth": 2} if marker else {}
        style = {**st, "label": st["label"] + suffix, **extra}
        ys = [y * scale for y in ys]
        spreads = [r[m].get(spread_key) for r in rows if r.get(m) and r[m].get(key) is not None] if spread_key else []
        if spreads and all(spreads):
            lo = [max(y - sp["min"] * scale, 0.0) for y, sp in zip(ys, spreads)]
            hi = [max(sp["max"] * scale - y, 0.0) for y, sp in zip(ys, spreads)]
            ax.errorbar(xs, ys, yerr=[lo, hi], capsize=4, linestyle=linestyle, alpha=alpha, **style)
            single = [(x, y) for x, y, sp in zip(xs, ys, spreads) if sp["repeats"] < 2]
            if single:
                ax.plot([p[0] for p in single], [p[1] for p in single], linestyle="none", marker="o", markersize=12,
                        mfc="none", color=st["color"], label=f"{st['label']}: 1 repeat (no spread)")
        else:
            ax.plot(xs, ys, linestyle=linestyle, alpha=alpha, **style)
        xs_all += xs
    return xs_all


def _no_data(ax, title: str, text: str) -> None:
    import textwrap

    ax.set_title(title, fontsize=11)
    ax.text(0.5, 0.5, textwrap.fill(text, 34), ha="center", va="center", fontsize=11, transform=ax.transAxes,
            bbox=dict(boxstyle="round", facecolor="#f2f2f2", edgecolor="#999999"))
    ax.set_xticks([])
    ax.set_yticks([])


def _save(fig, path: Path, dpi: int) -> Path:
    """Lay out, write and close a figure; returns its path."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def plot_tokens(rows, out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    xs = _plot_methods(ax, rows, "tokens", suffix=" (measured)")
    paper = [(r["history_length"], r["paper"]) for r in rows if r.get("paper")]
    if paper:
        ax.plot([p[0] for p in paper], [p[1]["userllm_tokens"] for p in paper], linestyle="--", marker="o",
                mfc="none", color=STYLE["userllm"]["color"], alpha=0.6, label="User-LLM (paper)")
        ax.plot([p[0] for p in paper], [p[1]["textprompt_tokens"] for p in paper], linestyle="--", marker="s",
                mfc="none", color=STYLE["textprompt"]["color"], alpha=0.6, label="TextPrompt (paper)")
    _finish(ax, "LLM input tokens per example", "tokens (log scale)", xs, log=True)
    return _save(fig, out / "tokens.png", dpi=120)


def plot_flops(rows, out: Path) -> Path:
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    for ax, phase, title in ((axes[0], "train", "Training step FLOPs"),
                             (axes[1], "inference", "Inference FLOPs (prefill + generated tokens)")):
        xs = _plot_methods(ax, rows, f"{phase}_measured_total", suffix=" measured")
        _plot_methods(ax, rows, f"{phase}_analytic_total", linestyle=":", suffix=" analytic", alpha=0.8, marker="x")
        _finish(ax, title + " per batch", "FLOPs (log scale)", xs, log=True)
    ax = axes[2]
    xs = []
    for key, label, st in (("reduction_inference_measured_llm", "LLM only, measured", dict(marker="o", color="#2ca02c")),
                           ("reduction_inference_measured_total", "all components, measured",
                            dict(marker="^", color="#9467bd")),
                           ("token_ratio", "6ND estimate (token ratio)", dict(marker="d", color="#7f7f7f"))):
        pts = [(r["history_length"], r[key]) for r in rows if r.get(key)]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=label, **st)
            xs += [p[0] for p in pts]
    paper = [(r["history_length"], r["paper"]["flops_reduction"]) for r in rows if r.get("paper")]
    if paper:
        ax.plot([p[0] for p in paper], [p[1] for p in paper], linestyle="--", marker="*", markersize=10,
                color="black", alpha=0.6, label="paper (Table 3)")
        xs += [p[0] for p in paper]
    _finish(ax, "Inference FLOPs reduction (TextPrompt / User-LLM)", "reduction (x, log scale)", xs, log=True)
    return _save(fig, out / "flops.png", dpi=110)


def plot_time(rows, out: Path) -> Path:
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    for ax, key, spread, title in ((axes[0], "train_step_s", "train_step_spread", "Training step time"),
                                   (axes[1], "prefill_s", "prefill_spread", "Prefill time (prompt + first token)"),
                                   (axes[2], "decode_per_token_s", None, "Decode time per generated token")):
        vals = [y for m in STYLE for y in _series(rows, m, key)[1]]
        in_s = bool(vals) and max(vals) >= 1.0            # seconds when anything takes a second or more
        xs = _plot_methods(ax, rows, key, scale=1.0 if in_s else 1e3, spread_key=spread)
        if xs:
            _finish(ax, title + " (batch; median, bars: min-max)" if spread else title + " (batch)",
                    "seconds" if in_s else "milliseconds", xs)
        else:
            _no_data(ax, title, "not measured")
    return _save(fig, out / "time.png", dpi=110)


def plot_memory(rows, summaries, out: Path) -> Path:
    kind = summaries[0].get("mem_kind", "memory") if summaries else "memory"
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    for ax, key, title in ((axes[0], "train_peak_mem", "Peak memory: training step"),
                           (axes[1], "inference_peak_mem", "Peak memory: inference")):
        xs = _plot_methods(ax, rows, key, scale=1 / 2**20)
        if xs:
            _finish(ax, f"{title} ({kind})", "MiB", xs)
        else:
            _no_data(ax, title, "not measured")
    return _save(fig, out / "memory.png", dpi=110)


def plot_energy(rows, summaries, out: Path) -> Path | None:
    """``energy.png``, or None (and no file) when no run measured GPU energy: the report says so instead."""
    keys = ("train_energy_j", "inference_energy_j")
    if not any(s.get(k) is not None for s in summaries for k in keys):
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    note = next((s.get("energy_note") for s in summaries if s.get("energy_note")), None) or "not measured"
    for ax, key, title in ((axes[0], keys[0], "GPU energy per training step"),
                           (axes[1], keys[1], "GPU energy per inference batch")):
        xs = _plot_methods(ax, rows, key)
        if xs:
            _finish(ax, title, "joules", xs)
        else:
            _no_data(ax, title, "energy " + note)
    return _save(fig, out / "energy.png", dpi=110)


def make_plots(rows: list[dict[str, Any]], summaries: list[dict[str, Any]], out: str | Path) -> list[Path]:
    """The PNGs written (energy.png only when some run measured energy)."""
    out = Path(out)
    (out / "energy.png").unlink(missing_ok=True)   # a stale one from an earlier report would contradict this one
    plots = [plot_tokens(rows, out), plot_flops(rows, out), plot_time(rows, out), plot_memory(rows, summaries, out),
             plot_energy(rows, summaries, out)]
    return [p for p in plots if p is not None]
