"""The whole exploration experiment for one seed, and the multi-seed driver behind ``python -m userllm.explore``.

Once (:func:`prepare`, seeded by ``--seed``): load the data -> hold out ``--test-fraction`` of the users ->
user encoder (``--encoder-checkpoint``, else pretrained on the training users' events only, so no
held-out event is ever trained on) -> the embedded LLM (or ``--llm``). Per seed (:func:`run_seed`): KMeans
interest clusters over the encoder's item table -> novel transitions + feedback -> novelty LLM and
user-aligned LLM, both trained on the training users' transitions -> evaluation on each held-out user's
last novel transition (:mod:`.evaluate`).

Run directory (``--out``): ``config.json``, ``metrics.json`` (every method's metrics per seed, their mean /
std, the target check, the selector's concentration (:mod:`.concentration`), clusters, training losses),
``table.md``, ``curve.png``, and per seed ``seed_<s>/result.json`` (its
metrics: rerunning the same command with the same ``--out`` reuses the seeds already finished),
``seed_<s>/picks.jsonl`` (one line per held-out user: its window's clusters, the actual novel cluster and
item, the feedback, every method's pick, the best-of-n samples and the aligned scores of their distinct
clusters, the aligned scores of all new clusters and the actual item's rank inside its cluster: what
:mod:`.rescore` needs) and ``seed_<s>/clusters.json`` (labels, sizes, the training users' novel targets).
The encoder pretrained here is cached beside the data (``explore-encoder-<key>.safetensors``, keyed by its
recipe, the data and the held-out users), as the default LLM's pretraining is (``llm-<key>/``): a rerun,
interrupted or not, pretrains neither again.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from ..factory import build_llm, build_model, cache_root, check_encoder_fits, load_data
from ..loop import pick_device, seed_everything
from ..metrics import seed_stats
from ..runs import write_metrics, write_run_config
from ..utils.atomic import write_json, write_text
from ..utils.cache import json_digest
from . import evaluate as ev
from .clusters import build_clusters, event_clusters, last_per_user, novel_transitions, split_users
from .concentration import PICKS_FILE, aggregate_concentration, concentration, format_concentration, read_picks
from .config import ExploreConfig
from .models import AlignedLLM, NoveltyLLM, Prompts, UserHead, contexts_at
from .pairs import negative_weight

RESULT_FILE = "result.json"
#: What a run directory made before an option existed did, where the option's default now differs.
LEGACY_DEFAULTS = {"aligned_head": "answer"}


#: What the brief encoder pretraining does not depend on: where it writes, how many threads / workers run it.
_NOT_IN_ENCODER_KEY = ("out", "cache_dir", "workers", "threads", "resume", "checkpoint")


def encoder_signature(pcfg, ds, test_users: np.ndarray) -> dict:
    """Everything the pretrained encoder depends on: the pretraining recipe (``pcfg``, a PretrainConfig, less
    :data:`_NOT_IN_ENCODER_KEY`), the data (its processed-cache entry, content-keyed, and its sizes) and the
    held-out users (bool [U], whose events it must never see)."""
    import hashlib

    recipe = {k: v for k, v in pcfg.to_dict().items() if k not in _NOT_IN_ENCODER_KEY}
    data = {"entry": Path(ds.cache_path).name if ds.cache_path else None, "users": ds.num_users,
            "items": ds.num_items, "events": ds.num_events}
    held_out = hashlib.sha256(np.packbits(np.asarray(test_users, dtype=bool)).tobytes()).hexdigest()[:16]
    return {"recipe": recipe, "data": data, "held_out_users": held_out}


def encoder_cache_path(cache_dir: Path, signature: dict) -> Path:
    """``<data cache>/explore-encoder-<key>.safetensors``: the key hashes :func:`encoder_signature`."""
    key = json_digest(signature, 16)
    return Path(cache_dir) / f"explore-encoder-{key}.safetensors"


def _cached_signature(path: Path) -> dict | None:
    from ..encoders import read_encoder_metadata

    try:
        return read_encoder_metadata(path).get("extra", {}).get("explore_signature")
    except UserError:                        # missing or damaged: pretrain again and overwrite it
        return None


def pretrain_on_train_users(cfg: ExploreConfig, ds, test_users: np.ndarray, seed: int, device, cache_dir: Path,
                            log):
    """A fresh encoder pretrained (userllm.pretrain's recipe) on the training users' train-part windows,
    or the one a previous run pretrained with the same :func:`encoder_signature` (cached beside the data,
    written atomically: an interrupted or repeated run, or another run on the same data and split, reuses
    it instead of pretraining again, ~16 min on ml-latest-small under load)."""
    from ..data.examples import PretrainWindows
    from ..encoders import load_encoder, save_encoder
    from ..encoders.pretraining import pretrain_encoder

    # The brief pretraining of userllm.train (its recipe at these data, encoder, width, depth and seed),
    # over --pretrain-window events.
    pcfg = dataclasses.replace(cfg.train_config(seed).pretrain_config(None), window=cfg.pretrain_window)
    signature = encoder_signature(pcfg, ds, test_users)
    path = encoder_cache_path(cache_dir, signature)
    if _cached_signature(path) == signature:
        log(f"encoder: pretrained weights from {path} (same recipe, data and held-out users)")
        return load_encoder(path, device), {"cache": str(path), "cached": True}
    windows = PretrainWindows(ds, pcfg.window, "train", stride=pcfg.effective_stride)
    keep = ~test_users[windows.user]
    windows.user, windows.start, windows.end = windows.user[keep], windows.start[keep], windows.end[keep]
    encoder, stats = pretrain_encoder(ds, pcfg, device, windows=windows, desc="pretrain encoder")
    save_encoder(encoder.cpu(), path, extra={"explore_signature": signature})
    log(f"encoder: pretrained on {int((~test_users).sum())} training users for {stats['steps']} steps, "
        f"loss {stats['first_loss']:.3f} -> {stats['final_loss']:.3f} ({stats['train_seconds']:.0f}s), "
        f"cached in {path}")
    return encoder.to(device).eval(), {**stats, "cache": str(path), "cached": False}


def load_encoder_checkpoint(cfg: ExploreConfig, ds, device):
    from ..encoders import load_encoder

    path = Path(cfg.encoder_checkpoint)
    if not path.is_file():
        raise UserError(f"--encoder-checkpoint {path}: file not found")
    encoder = load_encoder(path, device)
    check_encoder_fits(encoder, ds, cfg.window, f"--encoder-checkpoint {path}")
    return encoder


@dataclass
class Shared:
    """What every seed starts from: the data, the held-out users (bool [U]), the pretrained encoder and the
    pretrained LLM with its tokenizer (each seed trains copies)."""

    ds: object
    test_users: np.ndarray
    encoder: torch.nn.Module
    encoder_info: dict
    llm: torch.nn.Module
    tok: object
    device: torch.device


def prepare(cfg: ExploreConfig, out: Path, log=print) -> Shared:
    """Data, user split and encoder (seeded by ``--seed``), and the LLM. They are shared by the seeds, as
    pretrained models are: the repo's evaluations also score every seed on the same users; the seeds vary
    the clusters (KMeans initialisation), both LLMs' training and the sampling."""
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    tcfg = cfg.train_config(cfg.seed)
    ds = load_data(tcfg)
    test_users = split_users(ds.num_users, cfg.test_fraction, cfg.seed)
    if cfg.encoder_checkpoint is not None:
        encoder, info = load_encoder_checkpoint(cfg, ds, device), {"checkpoint": cfg.encoder_checkpoint}
    else:
        encoder, info = pretrain_on_train_users(cfg, ds, test_users, cfg.seed, device, cache_root(tcfg, ds), log)
    llm, tok = build_llm(tcfg, ds, log)
    return Shared(ds, test_users, encoder, info, llm, tok, device)


@dataclass
class SeedData:
    """One seed's clusters and novel transitions: ``ec`` int64 [E] the event clusters; ``train_tr`` the
    training users' transitions, ``heldout_tr`` all of the held-out users', ``test_tr`` their last ones
    (the evaluated ones); ``train_ctx`` / ``train_allowed``: the training contexts and their new clusters."""

    clusters: object
    ec: np.ndarray
    train_tr: object
    heldout_tr: object
    test_tr: object
    train_ctx: object
    train_allowed: list


def seed_data(cfg: ExploreConfig, seed: int, shared: Shared, log=print) -> SeedData:
    """KMeans clusters (seeded by ``seed``) and the novel transitions, split by the held-out users."""
    ds = shared.ds
    clusters = build_clusters(ds, shared.encoder.tables["item"].detach().cpu().numpy(), cfg.clusters, seed)
    ec = event_clusters(ds, clusters)
    tr = novel_transitions(ds, ec, cfg.window, cfg.follow_up, cfg.rating_threshold, cfg.feedback)
    is_test = shared.test_users[tr.user]
    train_tr = tr.subset(np.flatnonzero(~is_test))
    heldout_tr = tr.subset(np.flatnonzero(is_test))             # every novel transition of the held-out users
    test_tr = heldout_tr.subset(last_per_user(heldout_tr))
    if cfg.max_test_users and len(test_tr) > cfg.max_test_users:
        test_tr = test_tr.subset(np.sort(np.random.default_rng([seed, 5]).choice(len(test_tr), cfg.max_test_users,
                                                                                  replace=False)))
    if len(train_tr) == 0 or len(test_tr) == 0:
        raise UserError(f"no novel transitions to {'train on' if len(train_tr) == 0 else 'evaluate'}: the "
                        f"users need more than --window ({cfg.window}) + --follow-up ({cfg.follow_up}) events")
    log(f"clusters: {clusters.k} (sizes {clusters.sizes.min()}-{clusters.sizes.max()} items); novel transitions: "
        f"{len(train_tr)} of training users ({train_tr.positive.mean():.2f} positive), "
        f"{len(test_tr)} held-out users evaluated ({test_tr.positive.mean():.2f} positive)")
    train_ctx = contexts_at(ds, ec, train_tr.row, cfg.window)
    train_allowed = train_ctx.new_clusters(clusters.k)
    return SeedData(clusters, ec, train_tr, heldout_tr, test_tr, train_ctx, train_allowed)


def build_aligned(cfg: ExploreConfig, seed: int, shared: Shared, prompts: Prompts, clusters) -> AlignedLLM:
    """A fresh aligned LLM (``--aligned-strategy``, ``--aligned-head``) on copies of the shared LLM and encoder."""
    head = None
    if cfg.aligned_head == "user":
        head = UserHead(clusters.item_cluster, clusters.k, shared.encoder.config.d_model)
    model = build_model(cfg.aligned_train_config(seed), copy.deepcopy(shared.llm), copy.deepcopy(shared.encoder))
    return AlignedLLM(model.to(shared.device), prompts, shared.ds, shared.device, head)


def fit_aligned(aligned: AlignedLLM, cfg: ExploreConfig, seed: int, sd: SeedData, log=print) -> dict:
    """Train ``aligned`` on the training users' pairs, then measure it on the held-out users' (``heldout``)."""
    info = aligned.fit(sd.train_ctx, sd.train_tr.positive, sd.train_tr.cluster, sd.train_allowed, cfg, seed, log)
    info["heldout"] = aligned_heldout(aligned, aligned.ds, sd.ec, sd.heldout_tr, sd.train_tr, sd.clusters.k, cfg,
                                      seed)
    log(f"aligned LLM held-out: {format_heldout(info['heldout'])}")
    return info


def run_seed(cfg: ExploreConfig, seed: int, shared: Shared, out: Path, log=print) -> dict:
    """Cluster, train both LLMs and evaluate for ``seed``; writes ``out/picks.jsonl`` and ``out/clusters.json``."""
    t0 = time.time()
    seed_everything(seed)
    ds, encoder, device = shared.ds, shared.encoder, shared.device
    tcfg = cfg.train_config(seed)
    out.mkdir(parents=True, exist_ok=True)
    sd = seed_data(cfg, seed, shared, log)
    clusters, ec, train_tr, test_tr = sd.clusters, sd.ec, sd.train_tr, sd.test_tr
    popular = np.bincount(train_tr.cluster, minlength=clusters.k)       # the training users' novel targets
    write_json(out / "clusters.json", {"labels": clusters.labels, "sizes": clusters.sizes.tolist(),
                                       "train_targets": popular.tolist()})

    # Copies: a UserLLM hooks its cross-attention into its LLM's layers and trains the LLM and encoder.
    prompts = Prompts(clusters.labels, shared.tok, cfg.prompt_clusters)
    novelty = NoveltyLLM(build_model(tcfg, copy.deepcopy(shared.llm), copy.deepcopy(encoder)).to(device),
                         prompts, ds, device)
    aligned = build_aligned(cfg, seed, shared, prompts, clusters)
    novelty_info = novelty.fit(sd.train_ctx, train_tr.cluster, cfg, seed, log)
    aligned_info = fit_aligned(aligned, cfg, seed, sd, log)

    test_ctx = contexts_at(ds, ec, test_tr.row, cfg.window)
    results, records = ev.evaluate(ds, clusters, test_ctx, test_tr.cluster, test_tr.positive, popular, novelty,
                                   aligned, encoder, cfg.n_list, cfg.temperature, cfg.top_p, cfg.eval_batch_size,
                                   seed, device, cfg.selection, cfg.selection_temperature)
    lines = []
    for i, rec in enumerate(records):
        row = int(test_tr.row[i])
        lines.append(json.dumps({
            "user": int(test_tr.user[i]), "user_id": str(ds.events.user_ids[test_tr.user[i]]), "row": row,
            "recent": [clusters.labels[c] for c in test_ctx.recent[i]],
            "target": int(test_tr.cluster[i]), "target_label": clusters.labels[test_tr.cluster[i]],
            "target_item": ds.item_titles([ds.features["item"][row]])[0], "positive": bool(test_tr.positive[i]),
            "picks": rec["picks"], "pick_labels": {m: clusters.labels[c] for m, c in rec["picks"].items()},
            "samples": {str(n): s for n, s in rec["samples"].items()},
            "sample_scores": {str(n): s for n, s in rec["sample_scores"].items()},
            "aligned_all": {str(c): s for c, s in rec["aligned_all"].items()},
            ev.TARGET_RANK: rec[ev.TARGET_RANK]}))
    write_text(out / PICKS_FILE, "\n".join(lines) + "\n")
    return {"seed": seed, "results": results, "target": ev.target_met(results, cfg.n_list),
            "data": {"users": ds.num_users, "items": ds.num_items - 1, "events": ds.num_events,
                     "train_transitions": len(train_tr), "train_positive_rate": float(train_tr.positive.mean()),
                     "test_users": len(test_tr), "test_positive_rate": float(test_tr.positive.mean())},
            "encoder": shared.encoder_info, "novelty_training": novelty_info, "aligned_training": aligned_info,
            "seconds": round(time.time() - t0, 1)}


def aligned_heldout(aligned: AlignedLLM, ds, ec: np.ndarray, heldout_tr, train_tr, k: int, cfg: ExploreConfig,
                    seed: int) -> dict:
    """The aligned LLM's :meth:`~.models.AlignedLLM.heldout` AUCs on the held-out users' novel transitions
    (negatives weighted as in its training, by the training users' targets)."""
    ctx = contexts_at(ds, ec, heldout_tr.row, cfg.window)
    allowed = ctx.new_clusters(k)
    weight = negative_weight(train_tr.cluster, k, cfg.negative_sampling)
    return aligned.heldout(ctx, heldout_tr.positive, heldout_tr.cluster, allowed, cfg.aligned_negatives, weight,
                           cfg.aligned_eval_contexts, seed)


def format_heldout(h: dict) -> str:
    def f(x):
        return "-" if x is None else f"{x:.3f}"

    return (f"AUC {f(h['auc'])} (liked vs not among went-to {f(h['feedback_auc'])}, went-to vs not "
            f"{f(h['went_auc'])}, within a user {f(h['group_auc'])}; 0.5 = chance), score std "
            f"{h['score_std']:.4f}, {h['pairs']} pairs of {h['contexts']} contexts")


HELDOUT_AUCS = ("auc", "feedback_auc", "went_auc", "group_auc")


def aggregate_heldout(per_seed: list[dict | None]) -> dict:
    """{AUC name: {"mean", "std", "values"}} over the seeds that measured it (seeds finished before the
    held-out check existed have none)."""
    out = {}
    for k in HELDOUT_AUCS:
        out[k] = seed_stats([h[k] for h in per_seed if h and h.get(k) is not None])
    return out


def format_aggregate_heldout(held: dict) -> str:
    def f(k):
        v = held[k]
        return "-" if v["mean"] is None else f"{v['mean']:.3f} ± {v['std']:.3f}"

    return (f"Aligned LLM on held-out users' pairs (AUC, 0.5 = chance): yes vs no {f('auc')}, liked vs not among "
            f"went-to {f('feedback_auc')}, went-to vs not {f('went_auc')}, within a user {f('group_auc')}")


def run(cfg: ExploreConfig, log=print) -> dict:
    """Every seed, then the aggregate: metrics.json, table.md, curve.png in the run directory."""
    from ..factory import check_paths

    check_paths(cfg.train_config(cfg.seed))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out) if cfg.out else Path("runs") / f"explore-{cfg.dataset}-{time.strftime('%Y%m%d-%H%M%S')}"
    current = cfg.to_dict() | {"out": str(out)}
    if (out / "config.json").exists():
        # An option added since that run was made has its default there, or, where the default is not the
        # behaviour runs had before the option existed, that behaviour (LEGACY_DEFAULTS).
        saved = ExploreConfig().to_dict() | LEGACY_DEFAULTS | json.loads((out / "config.json").read_text())
        if {k: v for k, v in saved.items() if k != "seeds"} != {k: v for k, v in current.items() if k != "seeds"}:
            raise UserError(f"--out {out}: already holds a run with other options; choose another directory")
    write_run_config(out, current)
    seeds = [cfg.seed + i for i in range(cfg.seeds)]
    done = {s: json.loads((out / f"seed_{s}" / RESULT_FILE).read_text()) for s in seeds
            if (out / f"seed_{s}" / RESULT_FILE).is_file()}
    shared = prepare(cfg, out, log) if len(done) < len(seeds) else None
    per_seed = []
    for s in seeds:
        if s in done:                      # the same options finished this seed before (an interrupted run)
            log(f"--- seed {s}: reusing {out / f'seed_{s}' / RESULT_FILE}")
            per_seed.append(done[s])
            continue
        log(f"--- seed {s}")
        per_seed.append(run_seed(cfg, s, shared, out / f"seed_{s}", log))
        write_json(out / f"seed_{s}" / RESULT_FILE, per_seed[-1])
    agg = ev.aggregate([r["results"] for r in per_seed])
    what = f"{cfg.dataset}, K={cfg.clusters}, window {cfg.window}, {per_seed[0]['data']['test_users']} held-out users"
    title = f"{what}, {len(seeds)} seed{'s' if len(seeds) > 1 else ''} (mean ± std)"
    table = ev.format_table(agg, title)
    ev.plot_curve(agg, cfg.n_list, out / "curve.png", f"Best-of-n exploration: {title}")
    # Read back from every seed's picks (also of seeds finished by an earlier run of this command).
    conc = aggregate_concentration([concentration(read_picks(out / f"seed_{s}" / PICKS_FILE)) for s in seeds])
    conc_table = format_concentration(conc, f"Selector concentration: {title}")
    metrics = {"seeds": seeds, "n_values": cfg.n_list, "encoder": per_seed[0].get("encoder"), "mean": agg,
               "target": ev.target_met(ev.pooled([r["results"] for r in per_seed]), cfg.n_list),
               "target_per_seed": {str(r["seed"]): r["target"] for r in per_seed}, "concentration": conc,
               "per_seed": per_seed}
    held = aggregate_heldout([r["aligned_training"].get("heldout") for r in per_seed])
    metrics["aligned_heldout"] = held
    held_line = format_aggregate_heldout(held)
    write_metrics(out, metrics)
    write_text(out / "table.md", table + "\n\n" + conc_table + "\n\n" + held_line + "\n")
    log("")
    log(table)
    log("")
    log(conc_table)
    log(held_line)
    log(f"target (best-of-n beats n=1 on hit or positive rate at some n <= 16, diversity within 10%): "
        f"{ev.describe_target(metrics['target'])}")
    log(f"wrote {out}/metrics.json, table.md, curve.png, seed_*/picks.jsonl")
    return metrics
