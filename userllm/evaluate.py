"""Re-evaluate a finished run: ``python -m userllm.evaluate RUN_DIR``.

Rebuilds the run's model from ``config.json`` + ``llm/`` + ``encoder.json``
(:func:`userllm.factory.load_run`), loads its latest checkpoint (or ``--checkpoint``), scores it
(:func:`userllm.evaluation.evaluate_run`: constrained beam search or exact decoding, Recall@1/5/10 or ROUGE,
teacher-forced loss, popularity), prints the table and writes ``eval.json`` into the run directory (or ``--out FILE``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from .cli import ArgumentParser, run_cli, select_kernels
from .decoding import DECODERS
from .errors import UserError
from .evaluation import evaluate_run
from .factory import load_run


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m userllm.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="a run directory written by python -m userllm.train")
    parser.add_argument("--checkpoint", help="checkpoint file (default: the run's latest)")
    parser.add_argument("--eval-users", type=int, help="override the run's --eval-users (0 = all)")
    parser.add_argument("--beams", type=int, help="override the run's --beams")
    parser.add_argument("--decoder", choices=DECODERS, help="override the run's --decoder")
    parser.add_argument("--prior-weight", type=float, help="override the run's --prior-weight (W in log p(title | "
                        "user) - W log p(title | no history))")
    parser.add_argument("--split", choices=("val", "test"), default="test",
                        help="the examples scored: each user's last event (test) or the one before (val)")
    parser.add_argument("--out", help="write the results to this JSON file instead of RUN_DIR/eval.json (e.g. to keep "
                        "several decoders' results side by side)")
    parser.add_argument("--device", default=None, help="override the run's --device")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: the run's rule)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = None
    if args.out is not None:
        out = Path(args.out)
        if not out.parent.is_dir():
            raise UserError(f"--out {args.out}: the directory {out.parent} does not exist")
    run = load_run(args.run_dir, checkpoint=args.checkpoint, device=args.device, threads=args.threads,
                   overrides={"eval_users": args.eval_users, "beams": args.beams, "prior_weight": args.prior_weight,
                              "decoder": args.decoder})
    select_kernels(run.cfg, run.device)
    evaluate_run(run, split=args.split, out=out)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
