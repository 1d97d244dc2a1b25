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
    parser.add_argument("--calibrate-gate", choices=("bias", "gate"), default=None,
                        help="first fit the pointer's gate (--readout-pointer runs) on the validation split's true "
                        "next items, the rest of the model frozen: its bias alone, or its weights and bias "
                        "(userllm.calibration); the run's checkpoint is not changed")
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
    extra = None
    if args.calibrate_gate:
        extra = {"calibration": calibrate_run(run, args.calibrate_gate, args.split)}
    evaluate_run(run, split=args.split, out=out, extra=extra)
    return 0


def calibrate_run(run, fit: str, split: str) -> dict:
    """Fit the gate of ``run``'s pointer head on the validation split (:mod:`userllm.calibration`); print and
    return what it measured."""
    from .calibration import calibrate_gate
    from .data.examples import make_examples

    if getattr(run.model, "readout", None) is None or run.model.readout.copy_head is None:
        raise UserError(f"--calibrate-gate: the run {run.run_dir} has no pointer head (trained without "
                        "--readout-pointer)")
    if split == "val":
        raise UserError("--calibrate-gate: fits on the validation split, so evaluate with --split test")
    val = make_examples(run.ds, run.cfg.task, run.cfg.window, "val")
    cal = calibrate_gate(run.model, run.batcher, run.ds, val, fit=fit, batch_size=run.cfg.eval_batch_size,
                         device=run.device, amp=run.amp)
    print(f"calibrated the pointer's gate ({fit}) on {cal['examples']} validation users, {cal['tokens']} target "
          f"tokens: loss {cal['loss_before']:.3f} -> {cal['loss_after']:.3f} nats per token, mean gate "
          f"{cal['gate_before']:.3f} -> {cal['gate_after']:.3f}", flush=True)
    return cal


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
