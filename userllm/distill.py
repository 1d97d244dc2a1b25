"""Distillation stage for NextItem (issue 14): the User-LLM learns to write the title the frozen pretrained
encoder predicts, before (or instead of) the true next item.

Why: on ml-latest-small the true next item is mostly unpredictable (the encoder's own Recall@10 is
0.03-0.06), so per example the user's contribution to the target loss is tiny and the cross-attention
gates were trained shut (gain(shuf) ~ 0; README, "NextItem on ml-latest-small"). With the target drawn
from the encoder's own next-item distribution it is a learnable function of the user tokens, so every
example's gradient says "read the user"; the LLM's ranking of titles then tracks the encoder's.

``--distill-steps N``: the first N of the ``--steps`` optimizer steps replace each training example's
label by a draw from softmax(teacher scores / T) over the teacher's top ``--distill-topk`` items
(``--distill-temperature 0``: its top-1); the later steps use the true next items. The teacher is a
frozen copy of the run's encoder as it was before User-LLM training (the pretrained one), so it stays
fixed even when the strategy trains the encoder. Only the labels change: the window, prompt and user
tokens are the example's own.

``--caption-steps C`` (with ``--readout-tokens K``) puts a caption stage before it: in steps 0..C-1 the
first J (``--caption-replace``) of the K readout candidates of each example are items drawn uniformly
from the catalogue, each in the place (and with the score) of one of the encoder's J best
(:meth:`~userllm.integration.readout.NextItemReadout.candidates_replaced`), and the label is drawn among
the K as distillation draws it among the encoder's (softmax of the scores / ``--caption-temperature``,
which may go linearly to ``--caption-temperature-end`` over the stage).
The LLM must then write the title of the readout token the scores point to, for items it cannot guess
from popularity; distillation then runs for steps C..C+D-1 on the encoder's own candidates.
Why: distillation alone did not teach the LLM to read the readout (the readout module's docstring has
the measurement).
"""

from __future__ import annotations

import copy
from dataclasses import replace

import numpy as np
import torch
from torch import nn

from .data.examples import EventBatch, Examples, collate
from .data.vocab import UNK_ID


def step_generator(seed: int, step: int) -> torch.Generator:
    """The CPU generator of one training step's draws: a pure function of (seed, step), so a resumed run
    draws the same targets as the uninterrupted one."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, step]).generate_state(1)[0]))


def caption_generator(seed: int, step: int) -> torch.Generator:
    """The caption stage's own stream (a pure function of (seed, step), apart from the distillation's)."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, step, 1]).generate_state(1)[0]))


def top_candidates(scores: torch.Tensor, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores float32 [B, k], item ids int64 [B, k]) of each row's ``topk`` best items, best first; id 0 = UNK
    is never one. scores: float [B, V] next-item scores (any real scores)."""
    if scores.ndim != 2 or scores.shape[1] < 2:
        raise ValueError(f"scores must be [B, V] with V >= 2, got {tuple(scores.shape)}")
    if not 1 <= topk <= scores.shape[1] - 1:
        raise ValueError(f"topk must be in 1..{scores.shape[1] - 1}, got {topk}")
    s = scores.detach().float().clone()
    s[:, UNK_ID] = float("-inf")
    return s.topk(topk, dim=-1)


def draw_places(top: torch.Tensor, temperature: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """int64 [B]: one place per row of ``top`` (float [B, k], best first), drawn from softmax(top /
    temperature) on CPU (the [B, k] probabilities are small); 0 = always place 0 (no draw). On ``top``'s
    device."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0:
        return torch.zeros(top.shape[0], dtype=torch.int64, device=top.device)
    probs = torch.softmax(top.cpu() / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1).to(top.device)


def sample_targets(scores: torch.Tensor, topk: int, temperature: float,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw one item id per row from the teacher's top-``topk`` items.

    scores: float [B, V] next-item scores (any real scores; id 0 = UNK is never drawn).
    temperature: > 0 draws from softmax(top scores / temperature); 0 takes the top-1 (no draw).
    generator: a CPU generator (the draw runs on CPU; the [B, topk] probabilities are small).
    Returns int64 [B] item ids on ``scores``' device.
    """
    top, idx = top_candidates(scores, topk)                           # [B, k], sorted best first
    place = draw_places(top, temperature, generator)
    return idx.gather(1, place[:, None]).squeeze(1).to(torch.int64)


class EncoderTeacher:
    """A frozen copy of ``encoder`` (which must have ``score_next``) that relabels training batches.

    topk, temperature: see :func:`sample_targets`; seed: with the step, fixes every draw.
    """

    def __init__(self, encoder: nn.Module, topk: int, temperature: float, seed: int):
        if not hasattr(encoder, "score_next"):
            raise ValueError("distillation needs an encoder with a next-item head (score_next)")
        self.encoder = copy.deepcopy(encoder).eval().requires_grad_(False)
        self.topk, self.temperature, self.seed = topk, temperature, seed

    @torch.no_grad()
    def scores(self, events: EventBatch) -> torch.Tensor:
        """float32 [B, V]: the teacher's next-item scores after each window."""
        return self.encoder.score_next(events.features, events.lengths)

    def relabel(self, events: EventBatch, step: int) -> EventBatch:
        """``events`` with ``labels`` (int64 [B]) replaced by the teacher's draws for ``step``."""
        labels = sample_targets(self.scores(events), self.topk, self.temperature, step_generator(self.seed, step))
        return replace(events, labels=labels.to(events.labels.device))


@torch.no_grad()
def teacher_top1_examples(teacher: EncoderTeacher, ds, examples: Examples, *, batch_size: int = 256) -> Examples:
    """``examples`` with every label (int64 [n]) replaced by the teacher's top-1 next item after its window:
    the target distillation trains for, on which :func:`userllm.diagnostics.context_gain` then says how
    much the LLM reads of the user."""
    labels = np.empty(len(examples), dtype=np.int64)
    device = next(teacher.encoder.parameters()).device
    for a in range(0, len(examples), batch_size):
        idx = np.arange(a, min(a + batch_size, len(examples)))
        batch = collate(ds, examples, idx).to(device)
        labels[idx] = sample_targets(teacher.scores(batch), 1, 0.0).cpu().numpy()
    return replace(examples, labels=labels)


class CaptionStage:
    """Relabels training batches for the caption stage (module docstring).

    teacher: the :class:`EncoderTeacher` whose top-K candidates and score profile are used; k: the
    readout's candidates; replaced: how many of them (places 0..J-1) random items take (1..k);
    temperature: as :func:`sample_targets`, at step 0; num_items: V (id 0 = UNK, never drawn);
    temperature_end, steps: the temperature goes linearly from ``temperature`` at step 0 to
    ``temperature_end`` at step ``steps - 1`` (None: constant), see :meth:`temperature_at`.
    """

    def __init__(self, teacher: EncoderTeacher, k: int, replaced: int, temperature: float, num_items: int,
                 temperature_end: float | None = None, steps: int = 1):
        if num_items < 2 or not 1 <= k <= num_items - 1 or not 1 <= replaced <= k:
            raise ValueError(f"the caption stage needs 1 <= replaced <= k < num_items, got replaced={replaced}, "
                             f"k={k}, num_items={num_items}")
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        self.teacher, self.k, self.replaced = teacher, k, replaced
        self.temperature, self.num_items = temperature, num_items
        self.temperature_end = temperature if temperature_end is None else temperature_end
        self.steps = steps

    def temperature_at(self, step: int) -> float:
        """The label draw's temperature at ``step``: linear from the first to the last caption step.

        Why a curriculum: at a steep profile (temperature 0.2: the first place is the label 48% of the time
        on ml-latest-small) the copy is learnt, but the LLM's beams then follow the encoder's first few
        candidates only; from the start, a flat one (1.0) taught no copy at all (README, issue 14)."""
        frac = min(max(step, 0), self.steps - 1) / max(self.steps - 1, 1)
        return self.temperature + (self.temperature_end - self.temperature) * frac

    def relabel(self, events: EventBatch, step: int) -> tuple[EventBatch, torch.Tensor]:
        """(``events`` with ``labels`` int64 [B] drawn among the step's K candidates, the random items int64
        [B, J]); train the step inside ``readout.candidates_replaced(items)``."""
        g = caption_generator(self.teacher.seed, step)
        B = events.labels.shape[0]
        items = torch.randint(1, self.num_items, (B, self.replaced), generator=g)
        top, idx = top_candidates(self.teacher.scores(events).cpu(), self.k)   # the encoder's candidates, profile
        idx[:, :self.replaced] = items
        labels = idx.gather(1, draw_places(top, self.temperature_at(step), g)[:, None]).squeeze(1)
        return replace(events, labels=labels.to(events.labels.device)), items.to(events.labels.device)
