"""Validation and test Recall@k of every kept checkpoint of a pretraining run (``python -m userllm.pretrain``),
with the protocol of the stage's own final evaluation (leave-last-out, full ranking, the run's window and
users), for runs stopped before their end (the shared machine's time ran out) or to look back along one.

    python benchmarks/eval_checkpoints.py runs/sasrec-bce-w50 [--json out.json]

Prints one row per checkpoint (val and test Recall@1/5/10 and NDCG@10, popularity on the same users) and
names the checkpoint with the best validation Recall@10: the one an early stop would keep.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from userllm.checkpoint import list_checkpoints, load_checkpoint
from userllm.config import PretrainConfig
from userllm.encoders import build_encoder
from userllm.encoders.pretraining import train_item_counts
from userllm.errors import UserError
from userllm.evaluation import rank_next_items
from userllm.factory import ENCODER_SPEC_FILE, load_data
from userllm.pretrain import eval_indices
from userllm.runs import read_run_config


def evaluate_run(run: Path) -> list[dict]:
    """[{step, val: {encoder, popularity}, test: {...}}] for every checkpoint of ``run``, oldest first."""
    from userllm.data import next_item_eval

    if not (run / ENCODER_SPEC_FILE).is_file():
        raise UserError(f"{run}: not a pretraining run directory (no {ENCODER_SPEC_FILE})")
    cfg = PretrainConfig.from_dict(read_run_config(run), source=str(run / "config.json"))
    spec = json.loads((run / ENCODER_SPEC_FILE).read_text())
    ds = load_data(cfg)
    popularity = train_item_counts(ds)
    sets = {split: next_item_eval(ds, cfg.window, split) for split in ("val", "test")}
    rows = []
    for step, path in list_checkpoints(run):
        encoder = build_encoder(spec["kind"], spec["config"])
        load_checkpoint(path, encoder, restore_rng_state=False)
        row = {"step": step}
        for split, evalset in sets.items():
            row[split] = rank_next_items(encoder, ds, evalset, eval_indices(len(evalset), cfg), torch.device("cpu"),
                                         cfg.filter_seen, popularity)
        rows.append(row)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, help="a python -m userllm.pretrain run directory")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        rows = evaluate_run(args.run)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not rows:
        print(f"error: {args.run}: no checkpoints", file=sys.stderr)
        return 2
    print("step  split  encoder R@1/R@5/R@10  ndcg@10   popularity R@10  users")
    for r in rows:
        for split in ("val", "test"):
            e, p = r[split]["encoder"], r[split]["popularity"]
            print(f"{r['step']:5d}  {split:5s}  {e['recall@1']:.4f}/{e['recall@5']:.4f}/{e['recall@10']:.4f}  "
                  f"{e['ndcg@10']:.4f}   {p['recall@10']:.4f}  {e['count']}")
    best = max(rows, key=lambda r: r["val"]["encoder"]["recall@10"])
    print(f"best validation Recall@10: step {best['step']} ({best['val']['encoder']['recall@10']:.4f}); "
          f"its test Recall@1/5/10 {best['test']['encoder']['recall@1']:.4f}/{best['test']['encoder']['recall@5']:.4f}"
          f"/{best['test']['encoder']['recall@10']:.4f}")
    if args.json is not None:
        args.json.write_text(json.dumps({"run": str(args.run), "rows": rows, "best_step": best["step"]}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
