"""Post-hoc calibration of the pointer head's gate on held-out true next items (``--calibrate-gate``).

Why: the caption stage trains the pointer (:mod:`userllm.integration.copy_head`) on labels that are always
one of the readout's candidates, so its gate learns g ~ 1: the LLM's exact top 10 became the encoder's
(Recall@10 0.0590 on ml-latest-small), but a true next item outside the candidates keeps almost no
probability (test loss 11.3 nats per title token against 3.5 with no history, README "Session 10"). Training
300 more steps on true next items calibrated the loss (3.38) but undid the copy: the beams' Recall@10 fell
to 0.0262, because every weight moved.

Here only the gate moves, as temperature scaling (Guo et al., ICML 2017) fits one scalar on held-out data:
with the rest of the model frozen, each target token's own log-prob ``o``, pointer log-prob ``c`` and
hidden state ``h`` are computed once on the validation split (each user's second-to-last event, never a
training target), and the gate is fitted by L-BFGS to maximise

    mean over target tokens of  log( (1 - sigmoid(z)) e^o + sigmoid(z) e^c ),   z = w . h + b

``fit="bias"`` fits b alone (one number: it cannot overfit, and keeps how the trained gate varies with
h); ``fit="gate"`` fits w and b (d + 1 numbers). Rows whose readout has no copyable token are left out:
the gate does not act on them.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import numpy as np
import torch

from .data.examples import Examples, collate
from .integration.copy_head import mix

FITS = ("bias", "gate")
IGNORE = -100


@torch.no_grad()
def gate_inputs(model, batcher, ds, examples: Examples, *, batch_size: int = 32,
                device: torch.device | str = "cpu", amp: Callable = contextlib.nullcontext
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(hidden float32 [N, d], own float64 [N], copy float64 [N]) at the N target tokens of ``examples``
    whose row has a copyable readout token: what the output head read, and the LLM's and the pointer's
    log-probs of the target token. ``model``: a UserLLM with the pointer head, in eval mode."""
    head = model.readout.copy_head
    seen: list[tuple] = []
    handle = head.register_forward_hook(lambda module, args, out: seen.append(args))
    hs, owns, copies = [], [], []
    try:
        for a in range(0, len(examples), batch_size):
            idx = np.arange(a, min(a + batch_size, len(examples)))
            lb = batcher.train_batch(collate(ds, examples, idx)).to(device)
            seen.clear()
            with amp():
                ctx = model.prepare_user_context(lb.events.features, lb.events.lengths, cache_kv=False)
                model(input_ids=lb.input_ids, attention_mask=lb.attention_mask, user_context=ctx)
            if not seen:                                     # no row of this batch has a readout context
                continue
            hidden, logits, states, ids, lengths = seen[-1]
            own, log_copy, _, copyable = head.parts(hidden, logits, states, ids, lengths)
            labels = lb.labels[:, 1:]                        # position t predicts the token at t + 1
            keep = (labels != IGNORE) & copyable[:, None]
            target = labels.clamp_min(0)[..., None]
            hs.append(hidden[:, :-1][keep].float())
            owns.append(own[:, :-1].gather(-1, target)[..., 0][keep].double())
            copies.append(log_copy[:, :-1].gather(-1, target)[..., 0][keep].double())
    finally:
        handle.remove()
    if not hs:
        return torch.zeros(0, head.gate.in_features), torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.float64)
    return torch.cat(hs).cpu(), torch.cat(owns).cpu(), torch.cat(copies).cpu()


def _nll(hidden: torch.Tensor, own: torch.Tensor, copy: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return -mix(own, copy, hidden @ w + b).mean()


def fit_gate(hidden: torch.Tensor, own: torch.Tensor, copy: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
             fit: str = "bias", max_iter: int = 200) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """(weight [d], bias [], loss before, loss after): the gate (float64) that maximises the mixture's mean
    log-likelihood of the targets, from the start ``weight`` [d] and ``bias`` []; ``fit`` says which move."""
    if fit not in FITS:
        raise ValueError(f"fit must be one of {FITS}, got {fit!r}")
    h = hidden.double()
    w = weight.detach().double().clone().requires_grad_(fit == "gate")
    b = bias.detach().double().clone().requires_grad_(True)
    with torch.no_grad():
        before = float(_nll(h, own, copy, w, b))
    opt = torch.optim.LBFGS([b] if fit == "bias" else [w, b], lr=1.0, max_iter=max_iter,
                            line_search_fn="strong_wolfe", tolerance_grad=1e-10, tolerance_change=1e-12)

    def closure():
        opt.zero_grad()
        loss = _nll(h, own, copy, w, b)
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        after = float(_nll(h, own, copy, w, b))
    if not after <= before:            # L-BFGS never ends worse than its start on a convex-in-b objective,
        return weight.detach().double(), bias.detach().double(), before, before     # but keep it safe
    return w.detach(), b.detach(), before, after


def calibrate_gate(model, batcher, ds, examples: Examples, *, fit: str = "bias", batch_size: int = 32,
                   device: torch.device | str = "cpu", amp: Callable = contextlib.nullcontext) -> dict:
    """Fit the pointer's gate on ``examples`` (the validation split's true next items) and set it in
    ``model``. Returns what was measured: examples, target tokens, the fit, the mean target-token loss and
    the mean gate sigmoid(z) over those tokens before and after, and the gate's bias before and after."""
    head = model.readout.copy_head if getattr(model, "readout", None) is not None else None
    if head is None:
        raise ValueError("calibrate_gate: the model has no pointer head (--readout-pointer)")
    hidden, own, copy = gate_inputs(model, batcher, ds, examples, batch_size=batch_size, device=device, amp=amp)
    if len(own) == 0:
        raise ValueError("calibrate_gate: no target token with a copyable readout token in the examples")
    weight, bias = head.gate.weight[0].detach(), head.gate.bias[0].detach()
    gate = lambda w, b: float(torch.sigmoid(hidden.double() @ w.double() + b.double()).mean())  # noqa: E731
    g_before = gate(weight, bias)
    w, b, before, after = fit_gate(hidden, own, copy, weight, bias, fit)
    out = {"examples": len(examples), "tokens": int(len(own)), "fit": fit, "loss_before": before,
           "loss_after": after, "gate_before": g_before, "gate_after": gate(w, b),
           "bias_before": float(bias), "bias_after": float(b)}
    with torch.no_grad():
        head.gate.weight[0].copy_(w.to(head.gate.weight.dtype))
        head.gate.bias[0].copy_(b.to(head.gate.bias.dtype))
    return out
