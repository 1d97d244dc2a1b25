"""Build the User-LLM vs TextPrompt report from run directories' ``profile.json`` files.

    python -m userllm.profiling.report RUN_DIR [RUN_DIR ...] [--out DIR]

A RUN_DIR is a directory holding ``profile.json`` (written by ``python -m userllm.train --profile`` or by
:mod:`userllm.profiling.compare`), or a directory containing such directories (a compare output). Runs
are paired by history length: User-LLM (``method == "userllm"``) against TextPrompt. Writes
``report.md``, ``report.json`` and the PNG plots (tokens, FLOPs, time, memory, energy) into ``--out``
(default: the first RUN_DIR).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Sequence

from userllm.errors import UserError
from userllm.utils.atomic import write_json, write_text

PROFILE_FILE = "profile.json"

# The paper's Table 3 (User-LLM, arXiv 2402.13598): LLM input tokens and the FLOPs reduction of User-LLM
# against TextPrompt, by history length.
PAPER_TABLE3 = {50: {"userllm_tokens": 32, "textprompt_tokens": 700, "flops_reduction": 21.9},
                100: {"userllm_tokens": 32, "textprompt_tokens": 1350, "flops_reduction": 42.2},
                200: {"userllm_tokens": 32, "textprompt_tokens": 2500, "flops_reduction": 78.1}}


def find_profiles(paths: Sequence[str | Path]) -> list[Path]:
    """profile.json files of the given run directories (searched one and two levels down too)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_file() and p.name == PROFILE_FILE:
            out.append(p)
        elif (p / PROFILE_FILE).is_file():
            out.append(p / PROFILE_FILE)
        elif p.is_dir():
            found = sorted(p.glob(f"*/{PROFILE_FILE}")) + sorted(p.glob(f"*/*/{PROFILE_FILE}"))
            if not found:
                raise UserError(f"{p}: no {PROFILE_FILE} here or in its subdirectories")
            out.extend(found)
        else:
            raise UserError(f"{p}: no such run directory")
    return list(dict.fromkeys(out))


def load_profile(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: cannot read the profile ({exc})") from None
    run = data.get("run") or {}
    if "method" not in run or "history_length" not in run:
        raise UserError(f"{path}: profile has no run.method / run.history_length")
    data["_path"] = str(path)
    return data


def _get(d: Any, *keys: str, default: Any = None) -> Any:
    for k in keys:
        if not isinstance(d, dict) or k not in d or d[k] is None:
            return default
        d = d[k]
    return d


def _llm_and_total(flops_section: dict | None, which: str) -> tuple[float | None, float | None]:
    """(LLM FLOPs, total FLOPs) from a {"measured": summary, "analytic": breakdown} section."""
    if not flops_section:
        return None, None
    if which == "measured":
        m = flops_section.get("measured") or {}
        comps = m.get("components") or {}
        llm = _get(comps, "llm", "total")
        total = m.get("total")
        if total is None and comps:
            total = sum(v.get("total", 0) for v in comps.values())
        return llm, total
    a = flops_section.get("analytic") or {}
    return a.get("llm"), a.get("total")


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def summarize_run(p: dict[str, Any]) -> dict[str, Any]:
    """The figures of one profile that the report compares."""
    run, tr, inf = p["run"], p.get("train_step") or {}, p.get("inference") or {}
    B = run.get("batch_size") or _get(tr, "shape", "batch") or 1
    s: dict[str, Any] = {"method": run["method"], "history_length": int(run["history_length"]), "batch": B,
                         "path": p["_path"], "device": run.get("device"), "device_name": run.get("device_name"),
                         "torch": run.get("torch"), "commit": run.get("commit"),
                         "gpu_reason": _get(tr, "timing", "gpu", "reason"),
                         "tokens": _get(p, "tokens", "mean")}
    for phase, sec in (("train", tr.get("flops")), ("inference", _get(inf, "flops", "generate")),
                       ("prefill", _get(inf, "flops", "prefill")), ("decode", _get(inf, "flops", "decode_per_token"))):
        for which in ("measured", "analytic"):
            llm, total = _llm_and_total(sec, which)
            s[f"{phase}_{which}_llm"], s[f"{phase}_{which}_total"] = llm, total
    s["train_components"] = {k: v.get("total") for k, v in (_get(tr, "flops", "measured", "components") or {}).items()}
    s["inference_components"] = {k: v.get("total") for k, v in
                                 (_get(inf, "flops", "generate", "measured", "components") or {}).items()}
    s["train_step_s"] = _get(tr, "timing", "wall_s")
    s["train_step_spread"] = _spread(_get(tr, "timing"))
    # Throughput in what both methods produce alike: examples trained, tokens generated. (LLM input tokens/s
    # rewards the long text prompt: User-LLM reads ~15x fewer tokens per example, so it "looked" 15x slower.)
    s["train_examples_per_s"] = B / s["train_step_s"] if s["train_step_s"] else None
    s["train_peak_mem"] = _get(tr, "timing", "peak_mem_bytes") or _get(tr, "timing", "peak_rss_bytes")
    s["mem_kind"] = "GPU allocated" if _get(tr, "timing", "peak_mem_bytes") else "process RSS"
    s["train_energy_j"] = _get(tr, "timing", "energy_j")
    s["energy_note"] = _get(tr, "timing", "energy") if s["train_energy_j"] is None else None
    s["prefill_s"] = _get(inf, "timing", "prefill", "wall_s")
    s["generate_s"] = _get(inf, "timing", "generate", "wall_s")
    s["prefill_spread"] = _spread(_get(inf, "timing", "prefill"))
    s["generate_spread"] = _spread(_get(inf, "timing", "generate"))
    s["decode_per_token_s"] = _get(inf, "timing", "decode_per_token_s") or None
    s["inference_peak_mem"] = (_get(inf, "timing", "generate", "peak_mem_bytes")
                               or _get(inf, "timing", "generate", "peak_rss_bytes"))
    s["inference_energy_j"] = _get(inf, "timing", "generate", "energy_j")
    s["new_tokens"] = inf.get("new_tokens")
    s["generated_tokens_per_s"] = (B * s["new_tokens"] / s["generate_s"]) if s["new_tokens"] and s["generate_s"] \
        else None
    return s


# A timing whose repeats spread (max - min) by more than this fraction of their median is flagged as noisy:
# on the shared 2-core CI machine, repeats of one CPU step routinely differ by 30-100%.
NOISY_SPREAD = 0.2


def _spread(timing: dict | None) -> dict[str, Any] | None:
    """{"repeats", "median", "min", "max", "noisy"} of a timing section's per-repeat wall times."""
    if not timing or timing.get("wall_s") is None:
        return None
    walls = timing.get("wall_s_all") or [timing["wall_s"]]
    med = float(timing["wall_s"])
    lo, hi = min(walls), max(walls)
    return {"repeats": len(walls), "median": med, "min": lo, "max": hi,
            "noisy": len(walls) < 2 or (med > 0 and (hi - lo) / med > NOISY_SPREAD)}


def pair_runs(summaries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per history length with both methods and the TextPrompt / User-LLM ratios."""
    by: dict[int, dict[str, dict]] = {}
    for s in summaries:
        by.setdefault(s["history_length"], {})[s["method"]] = s
    rows = []
    for L in sorted(by):
        ul, tp = by[L].get("userllm"), by[L].get("textprompt")
        row: dict[str, Any] = {"history_length": L, "userllm": ul, "textprompt": tp, "paper": PAPER_TABLE3.get(L)}
        if ul and tp:
            row["token_ratio"] = _ratio(tp["tokens"], ul["tokens"])
            for phase in ("train", "inference", "prefill"):
                for which in ("measured", "analytic"):
                    for part in ("llm", "total"):
                        key = f"{phase}_{which}_{part}"
                        row[f"reduction_{key}"] = _ratio(tp[key], ul[key])
            row["timing_caveat"] = _caveat([ul.get(k) for k in ("train_step_spread", "generate_spread")] +
                                           [tp.get(k) for k in ("train_step_spread", "generate_spread")],
                                           ul.get("device"))
            row["speedup_train"] = _ratio(tp["train_step_s"], ul["train_step_s"])
            row["speedup_inference"] = _ratio(tp["generate_s"], ul["generate_s"])
            row["speedup_decode"] = _ratio(tp["decode_per_token_s"], ul["decode_per_token_s"])
        for s in (ul, tp):
            if s:
                for phase in ("train", "inference"):
                    s[f"{phase}_measured_over_analytic"] = _ratio(s[f"{phase}_measured_total"],
                                                                  s[f"{phase}_analytic_total"])
        rows.append(row)
    return rows


def _caveat(spreads: list[dict | None], device: str | None) -> str | None:
    """Why speed figures from these timings are not to be trusted as they stand, or None."""
    got = [sp for sp in spreads if sp]
    if not got:
        return None
    if any(sp["repeats"] < 2 for sp in got):
        return "from a single repeat"
    if any(sp["noisy"] for sp in got):
        where = "a noisy CPU" if (device or "cpu").startswith("cpu") else "a noisy device"
        return f"repeats spread by more than {NOISY_SPREAD:.0%} of the median ({where})"
    return None


# ---------------------------------------------------------------------------------------------- text
def _x(v: float | None, digits: int = 1) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}x"


def _num(v: float | None) -> str:
    if v is None:
        return "n/a"
    for unit, f in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(v) >= f:
            return f"{v / f:.3g}{unit}"
    return f"{v:.3g}"


def _sec(v: float | None) -> str:
    if v is None:
        return "n/a"
    return f"{v * 1e3:.1f} ms" if v < 1 else f"{v:.2f} s"


def _timed(v: float | None, spread: dict | None) -> str:
    """Median with its range and repeat count, e.g. ``12.1 ms [11.8-13.0, n=5]``; ``⚠`` when noisy."""
    if v is None or not spread:
        return _sec(v)
    flag = " ⚠" if spread["noisy"] else ""
    if spread["repeats"] < 2:
        return f"{_sec(v)} (1 repeat){flag}"
    return f"{_sec(v)} [{_sec(spread['min'])}-{_sec(spread['max'])}, n={spread['repeats']}]{flag}"


def _rate(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3g}"


def _mb(v: float | None) -> str:
    return "n/a" if v is None else f"{v / 2**20:.0f} MiB"


def _energy(s: dict | None, key: str) -> str:
    if not s:
        return "n/a"
    v = s.get(key)
    if v is not None:
        return f"{v:.3g} J"
    return s.get("energy_note") or "n/a"


def _inference_phrase(new_tokens: int | None) -> str:
    if new_tokens is None:
        return "inference was not profiled in these runs: training profiles only"
    return f"prefill + {new_tokens} generated tokens"


def render_markdown(rows: list[dict[str, Any]], summaries: list[dict[str, Any]], plots: list[str]) -> str:
    any_run = summaries[0]
    lines = ["# User-LLM vs TextPrompt: tokens, FLOPs, time, memory, energy", ""]
    lines.append(f"Device: **{any_run.get('device_name')}** (`{any_run.get('device')}`), torch "
                 f"{any_run.get('torch')}, commit `{any_run.get('commit')}`. Runs: {len(summaries)} profiles. "
                 f"Every figure below is per batch of {any_run['batch']} examples unless it says otherwise.")
    if any_run.get("gpu_reason"):
        lines.append(f"GPU power/energy: {any_run['gpu_reason']}; CPU time and FLOPs are still measured.")
    lines += ["", "## Table 3 (paper) against our measurements", "",
              "LLM input tokens per example (mean over the batch: BOS + prompt, plus soft-prompt positions; "
              "cross-attention adds none). FLOPs reduction = TextPrompt FLOPs / User-LLM FLOPs for inference "
              f"({_inference_phrase(any_run.get('new_tokens'))}). *LLM* counts the LLM alone (the paper's "
              "estimate); *total* adds the encoder, projection, Perceiver and cross-attention. *6ND* is the "
              "paper's 2N-per-token estimate: the token ratio.", "",
              "| history | User-LLM tokens | TextPrompt tokens | paper tokens (UL / TP) | 6ND estimate | "
              "LLM measured | LLM analytic | total measured | total analytic | paper |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ul, tp, paper = r["userllm"], r["textprompt"], r["paper"]
        pt = f"{paper['userllm_tokens']} / {paper['textprompt_tokens']}" if paper else "-"
        lines.append(
            f"| {r['history_length']} | {ul['tokens']:.1f} | {tp['tokens']:.1f} | {pt} | {_x(r.get('token_ratio'))} | "
            f"{_x(r.get('reduction_inference_measured_llm'))} | {_x(r.get('reduction_inference_analytic_llm'))} | "
            f"{_x(r.get('reduction_inference_measured_total'))} | {_x(r.get('reduction_inference_analytic_total'))} | "
            f"{_x(paper['flops_reduction']) if paper else '-'} |" if ul and tp else
            f"| {r['history_length']} | (needs both methods) |||||||||")
    lines += ["", "Training step FLOPs reduction (forward + backward, every parameter trainable):", "",
              "| history | LLM measured | LLM analytic | total measured | total analytic |",
              "|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r["userllm"] and r["textprompt"]:
            lines.append(f"| {r['history_length']} | {_x(r.get('reduction_train_measured_llm'))} | "
                         f"{_x(r.get('reduction_train_analytic_llm'))} | {_x(r.get('reduction_train_measured_total'))} | "
                         f"{_x(r.get('reduction_train_analytic_total'))} |")
    lines += ["", "## FLOPs per configuration (measured with FlopCounterMode; analytic beside)", "",
              "| history | method | train step | (analytic) | meas/analytic | inference | (analytic) | meas/analytic | "
              "train step by component |", "|---:|---|---:|---:|---:|---:|---:|---:|---|"]
    for s in sorted(summaries, key=lambda s: (s["history_length"], s["method"])):
        comp = ", ".join(f"{k} {_num(v)}" for k, v in s["train_components"].items())
        lines.append(f"| {s['history_length']} | {s['method']} | {_num(s['train_measured_total'])} | "
                     f"{_num(s['train_analytic_total'])} | {_x(s.get('train_measured_over_analytic'), 3)} | "
                     f"{_num(s['inference_measured_total'])} | {_num(s['inference_analytic_total'])} | "
                     f"{_x(s.get('inference_measured_over_analytic'), 3)} | {comp} |")
    energy = any(s.get("train_energy_j") is not None or s.get("inference_energy_j") is not None for s in summaries)
    lines += ["", "## Time, memory and energy (measured)", "",
              "Times are the median over the repeats, [min-max, n = repeats]; ⚠ marks a figure from one repeat "
              "or whose repeats spread by more than "
              f"{NOISY_SPREAD:.0%} of the median. Throughput: training examples/s and generated tokens/s "
              "(batch x new tokens / generation time).", "",
              "| history | method | train step | examples/s | prefill | decode / token | prefill + N tokens | "
              "generated tokens/s | peak memory (train / inference) |" + (" energy (train step / inference) |"
                                                                          if energy else ""),
              "|---:|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if energy else "")]
    for s in sorted(summaries, key=lambda s: (s["history_length"], s["method"])):
        lines.append(f"| {s['history_length']} | {s['method']} | {_timed(s['train_step_s'], s['train_step_spread'])} | "
                     f"{_rate(s['train_examples_per_s'])} | {_timed(s['prefill_s'], s['prefill_spread'])} | "
                     f"{_sec(s['decode_per_token_s'])} | {_timed(s['generate_s'], s['generate_spread'])} | "
                     f"{_rate(s['generated_tokens_per_s'])} | "
                     f"{_mb(s['train_peak_mem'])} / {_mb(s['inference_peak_mem'])} ({s['mem_kind']}) |" +
                     (f" {_energy(s, 'train_energy_j')} / {_energy(s, 'inference_energy_j')} |" if energy else ""))
    if not energy:
        note = next((s["energy_note"] for s in summaries if s.get("energy_note")), "not measured")
        lines += ["", f"Energy: {note} — no GPU energy was measured in these runs, so there is no energy plot."]
    speed = [r for r in rows if r.get("speedup_inference")]
    if speed:
        lines += ["", "Speed-up of User-LLM over TextPrompt (wall clock, ratio of medians): " + "; ".join(
            f"history {r['history_length']}: training {_x(r['speedup_train'])}, inference "
            f"{_x(r['speedup_inference'])}, decode/token {_x(r['speedup_decode'])}"
            + (f" (⚠ {r['timing_caveat']})" if r.get("timing_caveat") else "") for r in speed) + "."]
        if any(r.get("timing_caveat") for r in speed):
            lines.append("⚠ These speed-ups are indicative only: rerun with more repeats (`--steps`) on an idle "
                         "machine before quoting them.")
    if plots:
        lines += ["", "## Plots", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in plots]
    lines += ["", "## Sources", ""] + [f"- `{s['path']}`" for s in summaries] + [""]
    return "\n".join(lines)


def build_report(run_dirs: Sequence[str | Path], out: str | Path) -> Path:
    """Read the profiles, write ``report.md``, ``report.json`` and the PNGs into ``out``; returns report.md."""
    from .plots import make_plots

    profiles = [load_profile(p) for p in find_profiles(run_dirs)]
    if not profiles:
        raise UserError("no profiles to report on")
    summaries = [summarize_run(p) for p in profiles]
    rows = pair_runs(summaries)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plots = make_plots(rows, summaries, out)
    write_json(out / "report.json", {"rows": rows, "runs": summaries, "paper_table3": PAPER_TABLE3,
                                     "plots": [Path(p).name for p in plots]})
    path = out / "report.md"
    write_text(path, render_markdown(rows, summaries, plots))
    return path


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m userllm.profiling.report",
                                 description="Build the User-LLM vs TextPrompt report from runs' profile.json.")
    ap.add_argument("run_dirs", nargs="+", help="run directories (or directories of them) with profile.json")
    ap.add_argument("--out", default=None, help="report directory (default: the first RUN_DIR)")
    args = ap.parse_args(argv)
    out = Path(args.out) if args.out else Path(args.run_dirs[0])
    print(build_report(args.run_dirs, out))
    return 0


if __name__ == "__main__":
    from userllm.cli import run_cli

    raise SystemExit(run_cli(main))
