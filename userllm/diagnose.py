"""``python -m userllm.diagnose RUN_DIR``: a trained run's test users scored by constrained beam search and by
the likelihood ranking of the whole catalogue, beside the encoder's own recall (issue 14). The measurements
live in :mod:`userllm.diagnostics`; this is only their command line.

The ranking's Recall@1/5/10 need only its top 10: with ``--prior-weight 0`` they come from the exact top 10
of best-first search (:mod:`userllm.best_first`, ~0.6 s per user on ml-latest-small); a contrastive score
(W > 0) has no such bound, so then every catalogue entry is scored (~60 s per user there)."""

from __future__ import annotations

from .diagnostics import catalogue_likelihood_recall, encoder_recall
from .metrics import KS


def main(argv=None) -> int:
    """``python -m userllm.diagnose RUN_DIR [--users N]``: beam search vs exhaustive likelihood ranking."""
    import time

    from .cli import ArgumentParser, select_kernels
    from .data.examples import make_examples
    from .errors import UserError
    from .evaluation import eval_subset, generate_and_score
    from .factory import load_run
    from .utils.atomic import write_json

    parser = ArgumentParser(prog="python -m userllm.diagnose",
                            description="Score a run's test users by constrained beam search and by "
                                                 "the exhaustive likelihood ranking of the whole catalogue.")
    parser.add_argument("run_dir", help="a run directory written by python -m userllm.train")
    parser.add_argument("--users", type=int, default=50, help="test users (a fixed random subset; 0 = all)")
    parser.add_argument("--chunk", type=int, default=2048, help="catalogue entries per forward")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--prior-weight", type=float, default=None,
                        help="both rankings score log p(title | user) - W log p(title | no history) (default: "
                             "the run's --prior-weight)")
    args = parser.parse_args(argv)
    r = load_run(args.run_dir, threads=args.threads,
                 overrides={"eval_users": args.users, "prior_weight": args.prior_weight})
    w = r.cfg.prior_weight
    select_kernels(r.cfg, r.device)
    if r.batcher.catalogue is None:
        raise UserError(f"{args.run_dir}: task {r.cfg.task!r} has no catalogue to rank")
    ex = eval_subset(make_examples(r.ds, r.cfg.task, r.cfg.window, "test"), args.users)
    t0 = time.time()
    beams = generate_and_score(r.model, r.batcher, r.ds, ex, beams=r.cfg.beams, device=r.device, amp=r.amp,
                               disable_progress=True, prior_weight=w)
    t1 = time.time()
    if w:       # a contrastive score has no bound along a title: every entry is scored
        full = catalogue_likelihood_recall(r.model, r.batcher, r.ds, ex, chunk=args.chunk, device=r.device,
                                           amp=r.amp, prior_weight=w)
    else:       # the exact top K (best-first search) is the exhaustive ranking's, at ~1/100 of its cost
        exact = generate_and_score(r.model, r.batcher, r.ds, ex, beams=r.cfg.beams, device=r.device, amp=r.amp,
                                   disable_progress=True, decoder="exact")
        full = {k: exact[k] for k in exact if k.startswith("recall@")} | {"method": "best-first search",
                                                                           "expansions": exact["expansions"],
                                                                           "inexact": exact["inexact"]}
    t2 = time.time()
    out = {"run": str(r.run_dir), "checkpoint": str(r.checkpoint), "users": len(ex), "prior_weight": w,
           "beam_search": {k: beams[k] for k in beams if k.startswith("recall@")} | {"seconds": round(t1 - t0, 1)},
           "likelihood_ranking": full | {"seconds": round(t2 - t1, 1)}}
    enc = encoder_recall(r.model, r.ds, ex, device=r.device)
    if enc is not None:
        out["encoder"] = enc
    for name in ("beam_search", "likelihood_ranking", "encoder"):
        if name in out:
            m = out[name]
            print(f"{name:<20}" + "  ".join(f"R@{k} {m[f'recall@{k}']:.4f}" for k in KS if f"recall@{k}" in m))
    write_json(r.run_dir / "diagnostics.json", out)
    print(f"wrote {r.run_dir / 'diagnostics.json'}")
    return 0


if __name__ == "__main__":
    from .cli import run_cli

    raise SystemExit(run_cli(main))
