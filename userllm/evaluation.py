"""Evaluation of both stages: scoring, tables, and re-evaluating a finished run.

User-LLM / TextPrompt runs (:func:`evaluate_and_report`, :func:`evaluate_run`):

* NextItem: the model generates item titles with beam search constrained by a prefix trie over the
  catalogue's titles (every output is a real item); Recall@1/5/10 from the top-10 beams.
* FavGenre / FavCat: the same over the category names.
* ReviewG: greedy decoding, ROUGE-1/2/L/Lsum (``rouge-score`` via :func:`userllm.metrics.rouge`).

Also reported: the teacher-forced loss of the targets (a likelihood view of the same examples) and, for
NextItem / FavGenre, a popularity baseline on the same users (the most frequent training answers).

Encoder pretraining (:func:`rank_next_items`): full ranking over all items under leave-last-out,
Recall@1/5/10 and NDCG@10 of the encoder's next-item scores and of a popularity baseline.
"""

from __future__ import annotations

import contextlib
import time
from typing import Callable, Sequence

import numpy as np
import torch

from .best_first import best_first_search
from .data.examples import Examples, collate
from .decoding import (DECODERS, ContrastiveStepper, HFStepper, UserLLMStepper, constrained_beam_search, greedy_decode,
                       recall_from_beams)
from .loop import progress
from .metrics import KS

EVAL_FILE = "eval.json"
EVAL_SEED = 1234   # the users a User-LLM run is scored on do not depend on its training seed


def subset_indices(n: int, max_users: int, seed) -> np.ndarray:
    """Sorted indices of a fixed random subset of at most ``max_users`` of ``n`` examples (all when
    ``max_users`` is 0 or at least ``n``); ``seed``: anything ``np.random.default_rng`` takes."""
    if not max_users or max_users >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, max_users, replace=False))


def eval_subset(examples: Examples, max_users: int, seed=EVAL_SEED) -> Examples:
    """At most ``max_users`` examples (one per user on val/test), a fixed random subset in user order.

    The seed is fixed (not the training seed) so that runs with different seeds are scored on the same users.
    """
    if not max_users or max_users >= len(examples):
        return examples
    return examples.subset(subset_indices(len(examples), max_users, seed))


# ------------------------------------------------------------------------------------ User-LLM / TextPrompt
def _is_user_llm(model) -> bool:
    return getattr(model, "encoder", None) is not None


@torch.no_grad()
def teacher_forced_loss(model, batcher, ds, examples: Examples, batch_size: int, device, amp) -> float:
    """Mean target-token cross-entropy over ``examples`` (every target token weighs the same)."""
    total, count = 0.0, 0
    for a in range(0, len(examples), batch_size):
        lb = batcher.train_batch(collate(ds, examples, np.arange(a, min(a + batch_size, len(examples))))).to(device)
        with amp():
            logits = model(**lb.model_inputs()).logits
        shift_logits, shift_labels = logits[:, :-1].float(), lb.labels[:, 1:]
        loss = torch.nn.functional.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]),
                                                 shift_labels.reshape(-1), ignore_index=-100, reduction="sum")
        total += float(loss)
        count += int((shift_labels != -100).sum())
    return total / max(count, 1)


@torch.no_grad()
def generate_and_score(model, batcher, ds, examples: Examples, *, beams: int = 10, batch_size: int = 32,
                       device: torch.device | str = "cpu", amp=contextlib.nullcontext, max_new_tokens: int = 32,
                       disable_progress: bool | None = None, samples: int = 5, prior_weight: float = 0.0,
                       keep_entries: bool = False, decoder: str = "beam") -> dict:
    """Generate for every example and score: Recall@k (catalogue tasks) or ROUGE (reviewg).

    model: a UserLLM or a TextPromptModel; it is put in eval mode by the caller. prior_weight: W > 0 ranks
    catalogue entries by log p(entry | user) - W log p(entry | no history) (:class:`ContrastiveStepper`).
    Returns {"recall@k"... | "rougeLsum"...,  "count", "samples": [...], "decode_seconds"}, and with
    ``keep_entries`` (catalogue tasks) "entries": each example's decoded catalogue indices, best first.
    decoder: ``beam`` (constrained beam search of width ``beams``) or ``exact`` (the ``beams`` most likely
    entries, :func:`userllm.best_first.best_first_search`; adds "expansions": mean prefixes expanded per
    example, and "inexact": examples stopped by its expansion bound). Catalogue tasks only; not with W > 0.
    """
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}")
    tok = batcher.tok
    user_llm = _is_user_llm(model)
    contrastive = bool(prior_weight) and user_llm and batcher.catalogue is not None
    stepper = (ContrastiveStepper(model, prior_weight) if contrastive
               else UserLLMStepper(model) if user_llm else HFStepper(model.llm))
    catalogue = batcher.catalogue
    trie = catalogue.trie(tok) if catalogue is not None else None
    entries_all: list[list[int]] = []
    labels_all: list[int] = []
    preds, refs = [], []
    expansions: list[int] = []
    inexact = 0
    t0 = time.time()
    bar = progress(total=len(examples), desc=f"evaluate {batcher.task}", disable=disable_progress)
    for a in range(0, len(examples), batch_size):
        idx = np.arange(a, min(a + batch_size, len(examples)))
        pb = batcher.prompt_batch(collate(ds, examples, idx)).to(device)
        with amp():
            if user_llm:
                logits, past = stepper.prefill(pb.input_ids, pb.attention_mask, pb.events.features,
                                               pb.events.lengths)
            else:
                logits, past = stepper.prefill(pb.input_ids, pb.attention_mask)
            if trie is not None:
                if decoder == "exact":
                    if contrastive:
                        raise ValueError("the exact decoder needs log-likelihood scores (prior_weight 0)")
                    out = best_first_search(stepper, logits, past, trie, top_k=beams)
                    expansions += out.expansions
                    inexact += out.inexact
                else:
                    out = constrained_beam_search(stepper, logits, past, trie, num_beams=beams,
                                                  log_scores=contrastive)
                entries_all += out.entries
                labels_all += pb.entry_labels.tolist()
            else:
                ids = greedy_decode(stepper, logits, past, tok.eos_token_id, max_new_tokens)
                preds += [tok.decode(x, skip_special_tokens=True).strip() for x in ids]
                refs += pb.references
        bar.update(len(idx))
    bar.close()
    result: dict = {"count": len(examples), "decode_seconds": round(time.time() - t0, 2)}
    if contrastive:
        result["prior_weight"] = float(prior_weight)
    if decoder == "exact" and trie is not None:
        result.update(decoder="exact", expansions=round(float(np.mean(expansions)), 1) if expansions else 0.0,
                      inexact=inexact)
    if trie is not None:
        result.update(recall_from_beams(entries_all, labels_all, [k for k in KS if k <= beams]))
        if keep_entries:
            result["entries"] = entries_all
        result["samples"] = [{"reference": catalogue.entries[lab] if lab >= 0 else None,
                              "top3": [catalogue.entries[e] for e in ents[:3]]}
                             for ents, lab in zip(entries_all[:samples], labels_all[:samples])]
    else:
        from .metrics import rouge

        result.update(rouge(preds, refs))
        result["samples"] = [{"reference": r, "generated": p} for r, p in zip(refs[:samples], preds[:samples])]
    return result


def popularity_baseline(ds, train_examples: Examples, examples: Examples, catalogue) -> dict:
    """Recall@k of always answering the k most frequent training answers (items, or categories for FavGenre)."""
    counts = np.bincount(train_examples.labels[train_examples.labels > 0], minlength=len(catalogue.label_to_entry))
    ranked, seen = [], set()
    for item in np.argsort(-counts, kind="stable").tolist():
        e = int(catalogue.label_to_entry[item]) if item < len(catalogue.label_to_entry) else -1
        if e >= 0 and e not in seen:
            ranked.append(e)
            seen.add(e)
        if len(ranked) == max(KS):
            break
    labels = catalogue.label_to_entry[examples.labels].tolist()
    return {"count": len(examples), **recall_from_beams([ranked] * len(labels), labels, KS)}


# ------------------------------------------------------------------------------------ encoder pretraining
def rank_next_items(encoder, ds, evalset, idx: np.ndarray, device: torch.device, filter_seen: bool,
                    popularity: torch.Tensor | None = None, batch_size: int = 256) -> dict[str, dict]:
    """{"encoder": metrics, ["popularity": metrics]} over examples ``idx`` of a NextItemEval set: full
    ranking of every item by the encoder's next-item scores (and by ``popularity``), on ``device``
    (:func:`userllm.ranking.evaluate_next_item`: in place, popularity ranked once, memory ~5 x batch x items)."""
    from .ranking import evaluate_next_item

    return evaluate_next_item(encoder, ds, evalset, idx, device, filter_seen, popularity, batch_size=batch_size)


# ------------------------------------------------------------------------------------ tables
METRIC_COLUMNS = ("recall@1", "recall@5", "recall@10", "ndcg@10", "rouge1", "rouge2", "rougeLsum", "loss",
                  "context_gain", "context_gain_none")
# Short column titles of the diagnostics (userllm.diagnostics): loss with shuffled / no histories minus own.
COLUMN_TITLES = {"context_gain": "gain(shuf)", "context_gain_none": "gain(none)"}


def format_table(rows: Sequence[dict], title: str) -> str:
    """A plain-text results table; rows: {"model", ["task"], metric..., "count"} (the columns present)."""
    metric_cols = [c for c in METRIC_COLUMNS if any(c in r for r in rows)]
    text_cols = ["model"] + (["task"] if any("task" in r for r in rows) else [])
    cols = text_cols + metric_cols + ["users"]
    n_text = len(text_cols)
    head = {c: COLUMN_TITLES.get(c, c) for c in cols}
    width = {c: max(len(head[c]), *(len(_fmt(r.get(c if c != "users" else "count"))) for r in rows)) for c in cols}
    lines = [title, "  ".join(head[c].ljust(width[c]) if i < n_text else head[c].rjust(width[c])
                              for i, c in enumerate(cols))]
    for r in rows:
        vals = [_fmt(r.get(c if c != "users" else "count")) for c in cols]
        lines.append("  ".join(v.ljust(width[c]) if i < n_text else v.rjust(width[c])
                               for i, (c, v) in enumerate(zip(cols, vals))))
    return "\n".join(lines)


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


# ------------------------------------------------------------------------------------ a run's evaluation
def evaluate_and_report(cfg, model, batcher, ds, train_ex: Examples, test_ex: Examples, device, amp,
                        log: Callable[..., None], split: str, train_info: dict | None = None) -> dict:
    """Score ``model`` on ``test_ex`` (generation + teacher-forced loss, popularity beside it), print the
    table, and return the ``metrics.json`` / ``eval.json`` content."""
    model.eval()
    metrics = generate_and_score(model, batcher, ds, test_ex, beams=cfg.beams, batch_size=cfg.eval_batch_size,
                                 device=device, amp=amp, max_new_tokens=cfg.max_target_tokens,
                                 prior_weight=cfg.prior_weight, decoder=cfg.decoder)
    metrics["loss"] = teacher_forced_loss(model, batcher, ds, test_ex, cfg.eval_batch_size, device, amp)
    # Issue 14: whether the LLM uses the user (context gain, gates) and what its encoder alone ranks.
    from .diagnostics import encoder_recall, user_signal

    metrics.update(user_signal(model, batcher, ds, test_ex, batch_size=cfg.eval_batch_size, device=device, amp=amp))
    rows = [{"model": cfg.model_name, "task": cfg.task, **metrics}]
    results = {"model": cfg.model_name, "task": cfg.task, "dataset": cfg.dataset, "split": split,
               "window": cfg.window, split: metrics}
    if train_info:
        results["train"] = train_info
    if batcher.catalogue is not None:
        pop = popularity_baseline(ds, train_ex, test_ex, batcher.catalogue)
        results["baselines"] = {"popularity": pop}
        rows.append({"model": "popularity", "task": cfg.task, **pop})
        enc = encoder_recall(model, ds, test_ex, device=device)
        if enc is not None:
            results["baselines"]["encoder"] = enc
            rows.append({"model": "encoder (own head)", "task": cfg.task, **enc})
    contrast = (f", scores log p(title | user) - {cfg.prior_weight:g} log p(title | no history)"
                if cfg.prior_weight else "")
    search = (f"exact top {cfg.beams} by best-first search, {metrics['expansions']:g} expansions per user"
              if cfg.decoder == "exact" else f"constrained beam search, {cfg.beams} beams")
    what = (f"{search}{contrast}" if batcher.catalogue is not None
            else f"greedy decoding, at most {cfg.max_target_tokens} tokens")
    log("")
    log(format_table(rows, f"{cfg.dataset} {split} split, {metrics['count']} users, window {cfg.window} ({what})"))
    if train_info and train_info.get("first_loss") is not None:
        log(f"training: {train_info['steps']} steps, loss {train_info['first_loss']:.3f} -> "
            f"{train_info['final_loss']:.3f} in {train_info['train_seconds']:.0f}s; "
            f"decoding {metrics['decode_seconds']:.0f}s")
    if "gates" in metrics:
        log("tanh(gates) of the cross-attention blocks: attn " +
            ", ".join(f"{g:.3f}" for g in metrics["gates"]["attn"]) + "; ffn " +
            ", ".join(f"{g:.3f}" for g in metrics["gates"]["ffn"]))
    if "readout_copy" in metrics:
        c = metrics["readout_copy"]
        log(f"readout copy: a random item's title {c['loss_swapped_in']:.3f} nats/token in the top-1 place, "
            f"{c['loss_absent']:.3f} absent (gain {c['copy_gain']:.3f})")
    for s in metrics.get("samples", [])[:3]:
        log(f"  e.g. reference {s.get('reference')!r}: " +
            (f"top-3 {s['top3']}" if "top3" in s else f"generated {s['generated']!r}"))
    return results


def evaluate_run(run, split: str = "test", log: Callable[..., None] = print, out=None, extra: dict | None = None
                 ) -> dict:
    """Evaluate a :class:`~userllm.factory.LoadedRun` on ``split`` and write the results to ``out`` (a path;
    default ``eval.json`` in the run directory), with ``extra`` (e.g. the gate's calibration) added."""
    from .data.examples import make_examples
    from .utils.atomic import write_json

    cfg, ds = run.cfg, run.ds
    train_ex = make_examples(ds, cfg.task, cfg.window, "train", cfg.stride)
    test_ex = eval_subset(make_examples(ds, cfg.task, cfg.window, split), cfg.eval_users)
    results = evaluate_and_report(cfg, run.model, run.batcher, ds, train_ex, test_ex, run.device, run.amp, log,
                                  split=split)
    results["checkpoint"] = str(run.checkpoint)
    results.update(extra or {})
    path = run.run_dir / EVAL_FILE if out is None else out
    write_json(path, results)
    log(f"wrote {path}")
    return results
