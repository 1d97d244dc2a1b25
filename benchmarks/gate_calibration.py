"""How well the pointer's gate calibrates, and whether fitting its weights overfits (issue 14, session 11).

    python benchmarks/gate_calibration.py RUN_DIR [--seed 0]

On the run's validation split (each user's second-to-last event; ``userllm.calibration.gate_inputs``), fits the
gate of a ``--readout-pointer`` run both ways (``bias``: its bias alone; ``gate``: its weights too) on all target
tokens, and on a random half of them scored on the other half. Prints one JSON line: the token count, the loss
(nats per target token) as trained, each fit's in-sample loss and mean gate, and each fit's held-out loss. The
run's checkpoint is only read.
"""

from __future__ import annotations

import argparse
import json

import torch

from userllm.calibration import FITS, _nll, fit_gate, gate_inputs
from userllm.data.examples import make_examples
from userllm.factory import load_run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir")
    ap.add_argument("--seed", type=int, default=0, help="seed of the half split")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    run = load_run(args.run_dir, threads=args.threads)
    val = make_examples(run.ds, run.cfg.task, run.cfg.window, "val")
    hidden, own, copy = gate_inputs(run.model, run.batcher, run.ds, val, batch_size=run.cfg.eval_batch_size,
                                    device=run.device, amp=run.amp)
    head = run.model.readout.copy_head
    w0, b0 = head.gate.weight[0].detach(), head.gate.bias[0].detach()
    n = len(own)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(args.seed))
    a, b = perm[: n // 2], perm[n // 2:]
    out = {"run": args.run_dir, "tokens": n,
           "loss_as_trained": float(_nll(hidden.double(), own, copy, w0.double(), b0.double()))}
    for fit in FITS:
        w, bias, _, after = fit_gate(hidden, own, copy, w0, b0, fit)
        gate = torch.sigmoid(hidden.double() @ w + bias).mean()
        wh, bh, _, _ = fit_gate(hidden[a], own[a], copy[a], w0, b0, fit)
        out[fit] = {"loss": after, "mean_gate": float(gate), "bias": float(bias),
                    "held_out_loss": float(_nll(hidden[b].double(), own[b], copy[b], wh, bh))}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
