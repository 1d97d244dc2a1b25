"""``python -m userllm.explore.rescore --run DIR``: a finished exploration run re-evaluated with other best-of-n
selection rules (:mod:`.selection`), from its ``seed_<s>/picks.jsonl`` alone: no model is loaded or trained.

Each picks line holds the best-of-n samples with the aligned LLM's scores of their distinct clusters, its
scores of every new cluster (the lift rule's prior), the actual novel cluster, its feedback and the actual
item's rank inside that cluster, which is all that hit rate, positive feedback among hits, item Recall@10
and the diversity need; re-scoring with the run's own rule reproduces its figures. (Files of runs made
while the scores were still saved rounded reproduce them up to ties at that rounding: on seed 0 of the
ml-latest-small run with ``--aligned-negatives 0``, one user of 171 at n = 8 and at n = 16, where the
candidates' scores differed by < 1e-6. Without saved candidate scores they are looked up in the scores
of all new clusters.) Cost is not re-measured: every rule picks among the same candidates, so it is the
run's best-of-n cost. Writes ``DIR/rescore.json`` and ``DIR/rescore.md``, and prints the tables.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Sequence

import numpy as np

from ..config import Options, opt
from ..errors import UserError
from ..utils.atomic import write_json, write_text
from . import evaluate as ev
from .concentration import PICKS_FILE, read_picks
from .models import Cost
from .selection import SELECTIONS, additive_fit, select, selection_rng

#: Paired-bootstrap resamples of the gains over best-of-1: on seed 0 of the ml-latest-small run (171 users)
#: the interval ends moved by at most 0.006 (one user's hit) from 2,000 to 10,000 resamples, at 2.7 s
#: against 15.9 s for the four n of one rule.
BOOTSTRAP = 2000
QUALITY = ("hit", "pos_among_hits", f"item_recall@{ev.RECALL_K}", "distinct", "entropy", "users")


@dataclass
class RescoreConfig(Options):
    """Options of ``python -m userllm.explore.rescore``."""

    PROG: ClassVar[str] = "python -m userllm.explore.rescore"

    run: str | None = opt(None, "run directory of python -m userllm.explore (with seed_<s>/picks.jsonl)")
    selections: str = opt(",".join(SELECTIONS), f"selection rules, comma separated ({', '.join(SELECTIONS)})")
    selection_temperature: float = opt(1.0, "temperature of the softmax rule (> 0)", min=1e-6)

    def check(self) -> None:
        if self.run is None:
            raise UserError("--run: required (a run directory of python -m userllm.explore)")
        self.rules  # noqa: B018 - parses and checks --selections

    @property
    def rules(self) -> list[str]:
        rules = [r.strip() for r in self.selections.split(",") if r.strip()]
        bad = [r for r in rules if r not in SELECTIONS]
        if bad or not rules:
            raise UserError(f"--selections: expected some of {', '.join(SELECTIONS)}, got {self.selections!r}")
        return list(dict.fromkeys(rules))


def seed_dirs(run: Path) -> dict[int, Path]:
    """{seed: its directory} of the run's seeds that have picks (UserError when none)."""
    if not run.is_dir():
        raise UserError(f"--run {run}: not a directory")
    found = {int(d.name.split("_", 1)[1]): d for d in run.glob("seed_*")
             if d.name.split("_", 1)[1].isdigit() and (d / PICKS_FILE).is_file()}
    if not found:
        raise UserError(f"--run {run}: no seed_<s>/{PICKS_FILE} (not a finished python -m userllm.explore run)")
    return dict(sorted(found.items()))


def quality(picks: np.ndarray, records: Sequence[dict]) -> dict:
    """Hit, positive among hits, item R@10 and diversity of ``picks`` (int64 [U]) on the saved records."""
    target = np.array([r["target"] for r in records])
    positive = np.array([r["positive"] for r in records])
    rank = np.array([r[ev.TARGET_RANK] for r in records])     # on a hit, the rank inside the chosen cluster
    full = ev.pick_metrics(picks, target, positive, rank, Cost())
    return {k: full[k] for k in QUALITY}


def rescore_seed(records: Sequence[dict], k: int, seed: int, rule: str, temperature: float
                 ) -> tuple[dict[str, dict], dict[str, np.ndarray]]:
    """({method: quality metrics}, {method: picks int64 [U]}) of one seed: the run's baselines as saved,
    best-of-n re-selected by ``rule``."""
    if records and ev.TARGET_RANK not in records[0]:
        raise UserError(f"the run's {PICKS_FILE} has no {ev.TARGET_RANK!r} (made before it was recorded): "
                        "rerun it to re-score it")
    scores = [{int(c): s for c, s in r["aligned_all"].items()} for r in records]
    prior = additive_fit(scores, k)[0] if rule == "lift" else None
    chosen = {m: np.array([r["picks"][m] for r in records]) for m in ev.BASELINES}
    for n in sorted(int(n) for n in records[0]["samples"]):
        rng = selection_rng(seed, n)
        picks = []
        for r, s in zip(records, scores):
            cands = list(dict.fromkeys(r["samples"][str(n)]))
            saved = r.get("sample_scores", {}).get(str(n))            # the run's own candidate scores
            cand_scores = saved if saved else [s[c] for c in cands]
            # n = 1 is the sample itself, as in the run (which scores nothing there)
            picks.append(cands[0] if n == 1 else select(cands, cand_scores, rule, prior, temperature, rng))
        chosen[ev.best_of_n_name(n)] = np.array(picks)
    return {m: quality(p, records) for m, p in chosen.items()}, chosen


def paired_gain(records: Sequence[Sequence[dict]], picks: Sequence[np.ndarray], base: Sequence[np.ndarray],
                seed: int = 0, resamples: int = BOOTSTRAP) -> dict:
    """Gain of ``picks`` over ``base`` (per seed, int64 [U] each, on the same users) in hit rate and in positive
    feedback among hits, pooled over the seeds' (seed, user) pairs: {"hit": [gain, lo, hi], "pos_among_hits":
    [gain, lo, hi]}, with the 95% interval of a paired bootstrap over those pairs."""
    target = np.concatenate([[r["target"] for r in recs] for recs in records])
    positive = np.concatenate([[r["positive"] for r in recs] for recs in records]).astype(bool)
    a, b = np.concatenate(picks) == target, np.concatenate(base) == target

    def gains(idx):
        pos = [float(positive[idx][h[idx]].mean()) if h[idx].any() else np.nan for h in (a, b)]
        return float(a[idx].mean() - b[idx].mean()), pos[0] - pos[1]

    rng = np.random.default_rng([seed, 41])
    boot = np.array([gains(rng.integers(0, len(a), len(a))) for _ in range(resamples)])
    point = gains(np.arange(len(a)))
    def interval(col):            # NaN when no resample has hits under both (tiny data): no interval
        return np.nanpercentile(col, [2.5, 97.5]).tolist() if np.isfinite(col).any() else [np.nan, np.nan]

    return {key: [point[j], *interval(boot[:, j])] for j, key in enumerate(("hit", "pos_among_hits"))}


def format_gains(gains: dict[str, dict], title: str) -> str:
    lines = [title, "", "| method | hit-rate gain over best-of-1 (95% CI) | pos.-among-hits gain (95% CI) |",
             "| --- | --- | --- |"]
    for m, g in gains.items():
        lines.append(f"| {m} | " + " | ".join(f"{v[0]:+.3f} [{v[1]:+.3f}, {v[2]:+.3f}]"
                                              for v in (g["hit"], g["pos_among_hits"])) + " |")
    return "\n".join(lines)


def rescore(cfg: RescoreConfig, log=print) -> dict:
    run = Path(cfg.run)
    seeds = seed_dirs(run)
    per_seed = {s: (read_picks(d / PICKS_FILE), len(json.loads((d / "clusters.json").read_text())["labels"]))
                for s, d in seeds.items()}
    n_list = sorted(int(n) for n in next(iter(per_seed.values()))[0][0]["samples"])
    doc, tables = {"run": str(run), "seeds": list(seeds), "rules": {}}, []
    for rule in cfg.rules:
        both = [rescore_seed(recs, k, s, rule, cfg.selection_temperature) for s, (recs, k) in per_seed.items()]
        results, picks = [r for r, _ in both], [p for _, p in both]
        recs = [recs for recs, _ in per_seed.values()]
        gains = {ev.best_of_n_name(n): paired_gain(recs, [p[ev.best_of_n_name(n)] for p in picks],
                                                   [p[ev.best_of_n_name(1)] for p in picks])
                 for n in n_list if n > 1}
        agg = ev.aggregate(results)
        what = f"--selection {rule}" + (f" (T = {cfg.selection_temperature:g})" if rule == "softmax" else "")
        title = f"{what}: {run}, {len(seeds)} seed{'s' if len(seeds) > 1 else ''} (mean ± std)"
        target = ev.target_met(ev.pooled(results), n_list)
        doc["rules"][rule] = {"mean": agg, "target": target, "gain_over_n1": gains,
                              "per_seed": dict(zip(map(str, seeds), results))}
        gains_title = (f"Paired gains over best-of-1, {what}: every (seed, user) pair pooled, "
                       "bootstrap 95% intervals")
        tables.append(f"{ev.format_table(agg, title)}\n\ntarget: {ev.describe_target(target)}\n\n"
                      + format_gains(gains, gains_title))
    doc["selection_temperature"] = cfg.selection_temperature
    write_json(run / "rescore.json", doc)
    text = "\n\n".join(tables) + "\n\nCost columns: the run's best-of-n cost (every rule picks among the same " \
                                 "candidates).\n"
    write_text(run / "rescore.md", text)
    log(text)
    return doc


def main(argv: Sequence[str] | None = None) -> int:
    from ..cli import user_errors
    from ..config import parse_config

    cfg = parse_config(argv, cls=RescoreConfig)
    with user_errors():
        rescore(cfg)
    return 0


if __name__ == "__main__":
    from ..cli import run_cli

    raise SystemExit(run_cli(main))
