"""``python -m userllm.journeys``: extract, name and evaluate every user's persistent interest journeys.

    python -m userllm.journeys                                    # synthetic data, a few CPU minutes
    python -m userllm.journeys --dataset movielens --data-path ../shared/data/movielens/ml-latest-small \\
        --encoder-checkpoint runs/enc-ml-small/encoder.safetensors --out runs/journeys-ml
    python -m userllm.journeys --method prompt --integration xattn    # one naming method
    python -m userllm.journeys --llm /path/to/hf-causal-lm            # any local HF causal LM

Pipeline: data -> the user encoder (``--encoder-checkpoint``, else pretrained briefly as in
``userllm.train``) -> per-user journeys (:mod:`.extract`) and their quality -> users split into train /
test (``--test-fraction``; the split is by user, so no test user's journeys or tags are trained on) ->
names from the data for the training journeys (supervision) and the test journeys (held-out references,
:mod:`.references`) -> the non-LLM baseline and the naming methods (:mod:`.naming`) on the test journeys
-> the tables (:mod:`.scoring`).

Run directory: ``config.json``, ``journeys.jsonl`` (one line per user: split, events, journeys with their
items, timestamps, span, size, salience, reference and names; users without a persistent journey have
an empty list and a note), ``metrics.json`` (quality, name scores, training logs) and
``timelines/user_<id>.png`` for ``--plot-users`` test users (a seeded sample of those with journeys).
Generated names are reduced to their distinct labels (greedy decoding of a small LLM repeats them).
"""

from __future__ import annotations

import datetime as dt
import json
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..cli import run_cli
from ..config import parse_config
from ..errors import UserError
from ..training import pick_device, seed_everything, write_metrics, write_run_config
from .config import JourneysConfig
from .extract import embedding_vectors, extract_all, genre_vectors, item_vectors, journey_quality
from .naming import (build_llm, build_namer, fewshot_names, generate_names, journey_corpus, train_namer)
from .references import LabelSource, distinct_labels
from .scoring import NAME_COLUMNS, format_rows, name_scores

QUALITY_SPACES = ("embedding", "genre")


def _iso(ts: int) -> str:
    return dt.datetime.fromtimestamp(int(ts), dt.timezone.utc).strftime("%Y-%m-%d")


def load_inputs(cfg: JourneysConfig, run_dir: Path, device: torch.device, log=print):
    """(dataset, LabelSource, encoder) with the project's one-line errors for a missing checkpoint or fields."""
    from ..data.readers import read_movielens_tags
    from ..train import Dist, build_encoder_for, load_data

    if cfg.encoder_checkpoint is not None and not Path(cfg.encoder_checkpoint).is_file():
        raise UserError(f"--encoder-checkpoint {cfg.encoder_checkpoint}: no encoder checkpoint there "
                        f"(python -m userllm.pretrain --out DIR writes DIR/encoder.safetensors)")
    ds = load_data(cfg)
    tags = read_movielens_tags(cfg.data_path) if cfg.dataset == "movielens" else None
    labels = LabelSource(ds, tags)
    encoder = build_encoder_for(cfg, ds, run_dir, Dist(0, 1, device), log).eval()
    if not hasattr(encoder, "tables") or "item" not in encoder.tables:
        raise UserError("the encoder has no item embedding table ('item' feature) to cluster events by")
    return ds, labels, encoder


def split_users(num_users: int, test_fraction: float, seed: int) -> np.ndarray:
    """bool [U]: True for the test users (a seeded random ``test_fraction`` of them)."""
    test = np.zeros(num_users, dtype=bool)
    test[np.random.default_rng([seed, 11]).permutation(num_users)[: round(test_fraction * num_users)]] = True
    return test


def run(cfg: JourneysConfig, log=print) -> dict:
    t_start = time.time()
    seed_everything(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device)
    run_dir = Path(cfg.out or f"runs/journeys-{cfg.dataset}-{time.strftime('%Y%m%d-%H%M%S')}")
    run_dir.mkdir(parents=True, exist_ok=True)
    write_run_config(run_dir, cfg.to_dict())
    ds, labels, encoder = load_inputs(cfg, run_dir, device, log)

    vectors = item_vectors(encoder, ds, cfg.genre_weight)
    extracted = extract_all(ds, vectors, cfg)
    quality = journey_quality(ds, extracted, {"embedding": embedding_vectors(encoder), "genre": genre_vectors(ds)},
                              cfg.seed)
    log(format_rows([{"space": s, "journeys": quality["coherence"][s], "random groups": quality["random"][s],
                      "ratio": quality["ratio"][s]} for s in QUALITY_SPACES],
                    ["space", "journeys", "random groups", "ratio"],
                    f"{cfg.dataset}: {quality['journeys']} persistent journeys (>= {cfg.min_events} events over "
                    f">= {cfg.min_days:g} days) of {quality['users']} users; coherence = mean intra-journey cosine"))
    log(f"per user {quality['journeys_per_user']:.2f} journeys, mean size {quality['mean_size']:.1f} events, "
        f"mean span {quality['mean_span_days']:.0f} days ({quality['mean_span_share']:.0%} of the user's active "
        f"period), {quality['coverage']:.0%} of each user's history covered")
    without = [u.user for u in extracted if not u.journeys]
    if without:
        ids = ", ".join(str(ds.events.user_ids[u]) for u in without[:8])
        log(f"{len(without)} of {len(extracted)} users have no persistent journey (e.g. users {ids}); "
            f"they are listed in journeys.jsonl with an empty list")

    # ---- names from the data: supervision (training users' tags only) and held-out references (all tags)
    test_user = split_users(ds.num_users, cfg.test_fraction, cfg.seed)
    train_j = [j for u in extracted if not test_user[u.user] for j in u.journeys]
    test_j = [j for u in extracted if test_user[u.user] for j in u.journeys]
    items = lambda j: ds.features["item"][j.rows]  # noqa: E731
    train_names = [labels.name(items(j), cfg.name_labels, ~test_user)[0] for j in train_j]
    references = [labels.name(items(j), cfg.name_labels) for j in test_j]
    # The non-LLM baseline: the journey's single most frequent tag (training users' tags) or genre. Its
    # top-k labels would not be a baseline: on the genre fallback they are the reference by definition.
    names: dict[str, list[str]] = {"baseline": [labels.name(items(j), 1, ~test_user)[0] for j in test_j]}
    training: dict[str, dict] = {}
    methods = cfg.methods if test_j else ()
    if cfg.methods and not test_j:
        log("no test journeys: nothing to name (lower --min-events / --min-days or raise --test-fraction)")
    if methods and not train_j:
        raise UserError("no training journeys to learn or pick names from: lower --min-events / --min-days or "
                        "--test-fraction")
    corpus = journey_corpus(sorted(set(train_names)))

    def centroid(rows):
        c = vectors[ds.features["item"][rows]].mean(axis=0)
        return c / max(float(np.linalg.norm(c)), 1e-12)

    for method in methods:
        from ..encoders import load_encoder

        llm, tok = build_llm(cfg, ds, corpus, log)
        if method == "fewshot":
            t0 = time.time()
            names[method] = fewshot_names(llm, tok, ds, [j.rows for j in test_j], [j.rows for j in train_j],
                                          train_names, centroid, cfg, device)
            training[method] = {"seconds": round(time.time() - t0, 2), "shots": cfg.shots}
            continue
        fresh = load_encoder(_encoder_path(cfg, run_dir), device)   # every namer starts from the pretrained one
        model = build_namer(method, cfg, llm, fresh)
        training[method] = train_namer(model, tok, ds, [j.rows for j in train_j], train_names, cfg, device,
                                       desc=f"train {method} namer")
        names[method] = generate_names(model, tok, ds, [j.rows for j in test_j], cfg, device)
        log(f"{method}: {training[method]['steps']} steps, loss {training[method]['first_loss']:.3f} -> "
            f"{training[method]['final_loss']:.3f} ({training[method]['trainable']} trainable parameters, "
            f"{training[method]['seconds']:.0f}s)")

    refs = [r for r, _ in references]
    names = {m: [distinct_labels(n) for n in ns] for m, ns in names.items()}
    scores = {m: name_scores(n, refs) for m, n in names.items()}
    sources = {s: sum(1 for _, src in references if src == s) for s in ("tags", "categories", "titles")}
    if test_j:
        log("")
        log(format_rows([{"method": m, **scores[m], "journeys": scores[m]["count"]} for m in names],
                        ["method", *NAME_COLUMNS, "journeys"],
                        f"names of {len(test_j)} test journeys ({int(test_user.sum())} test users) against the "
                        f"held-out references (from {', '.join(f'{k}: {v}' for k, v in sources.items() if v)})"))
        for i in range(min(3, len(test_j))):
            log(f"  e.g. reference {refs[i]!r}: " + ", ".join(f"{m} {names[m][i]!r}" for m in names))

    _write_journeys(run_dir / "journeys.jsonl", ds, extracted, test_user, train_j, train_names, test_j,
                    references, names)
    plots = _plot_users(run_dir, ds, extracted, test_user, test_j, references, names, cfg)
    results = {"dataset": cfg.dataset, "quality": quality, "names": scores, "reference_sources": sources,
               "train_journeys": len(train_j), "test_journeys": len(test_j), "test_users": int(test_user.sum()),
               "training": training, "timelines": [str(p) for p in plots],
               "total_seconds": round(time.time() - t_start, 2)}
    write_metrics(run_dir, results)
    log(f"wrote {run_dir}/journeys.jsonl, metrics.json and {len(plots)} timelines ({results['total_seconds']:.0f}s)")
    return results


def _encoder_path(cfg: JourneysConfig, run_dir: Path) -> Path:
    from ..pretrain import ENCODER_FILE

    return Path(cfg.encoder_checkpoint) if cfg.encoder_checkpoint else run_dir / "pretrain" / ENCODER_FILE


def _write_journeys(path: Path, ds, extracted, test_user, train_j, train_names, test_j, references, names) -> None:
    name_of = {id(j): {"supervision": n} for j, n in zip(train_j, train_names)}
    for i, j in enumerate(test_j):
        name_of[id(j)] = {"reference": references[i][0], "reference_source": references[i][1],
                          "names": {m: names[m][i] for m in names}}
    raw_items = np.asarray(ds.events.items.raw_ids).astype(str)
    with open(path, "w", encoding="utf-8") as fh:
        for uj in extracted:
            lo, hi = int(ds.offsets[uj.user]), int(ds.offsets[uj.user + 1])
            rec = {"user": str(ds.events.user_ids[uj.user]), "split": "test" if test_user[uj.user] else "train",
                   "events": hi - lo, "journeys": []}
            if not uj.journeys:
                rec["note"] = "no persistent journey"
            for rank, j in enumerate(uj.journeys, 1):
                cat = ds.item_index[ds.features["item"][j.rows]]
                rec["journeys"].append({
                    "rank": rank, "size": j.size, "start": _iso(j.start), "end": _iso(j.end),
                    "span_days": round(j.span_days, 2), "salience": round(j.salience, 4),
                    "items": raw_items[cat].tolist(), "timestamps": ds.events.timestamp[j.rows].tolist(),
                    **name_of[id(j)]})
            fh.write(json.dumps(rec) + "\n")


def _plot_users(run_dir: Path, ds, extracted, test_user, test_j, references, names, cfg) -> list[Path]:
    from .plot import plot_timeline

    index = {id(j): i for i, j in enumerate(test_j)}
    method = next((m for m in ("finetune", "prompt", "fewshot") if m in names), "baseline")
    candidates = [u for u in extracted if test_user[u.user] and u.journeys]
    pick = np.random.default_rng([cfg.seed, 5]).permutation(len(candidates))[: cfg.plot_users]
    chosen = [candidates[i] for i in sorted(pick)]
    paths = []
    for uj in chosen:
        lo, hi = int(ds.offsets[uj.user]), int(ds.offsets[uj.user + 1])
        lanes = [f"{names[method][index[id(j)]] or '(empty)'}  [{j.size} events]\nref: {references[index[id(j)]][0]}"
                 for j in uj.journeys]
        raw = ds.events.user_ids[uj.user]
        title = (f"{cfg.dataset} user {raw}: {hi - lo} events, {len(uj.journeys)} persistent journeys, "
                 f"named by {method} (ref = held-out reference)")
        paths.append(plot_timeline(run_dir / "timelines" / f"user_{raw}.png", ds.events.timestamp[lo:hi],
                                   uj.labels, lanes, title))
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_config(argv, cls=JourneysConfig, prog="python -m userllm.journeys",
                       description=__doc__.split("\n\n")[0])
    run(cfg)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
