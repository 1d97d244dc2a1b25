"""Beam search constrained by a prefix trie over a catalogue (item titles or category names).

Every finished hypothesis is a catalogue entry: at each step a beam may only extend with a token that
continues some entry's token sequence, and may only emit EOS where an entry ends. The search is batched
(B examples x K beams) and model-agnostic: it drives a ``step_fn`` that owns the model state.

``step_fn(input_ids, past, beam_idx) -> (logits, past)``
    input_ids: int64 [R, 1], the token each beam appends (R = B * num_beams);
    past:      opaque model state (KV cache, attention mask, user context ...) from the previous call or
               from the prefill;
    beam_idx:  int64 [R]; before appending, row r of the new state is row ``beam_idx[r]`` of ``past``
               (the first call expands the B prefill rows to B * num_beams beams this way);
    logits:    float [R, V], next-token logits at the appended position.

:class:`HFStepper` implements it for any Hugging Face causal LM (the TextPrompt baseline); User-LLM wraps
its own forward the same way, reordering its user context with ``UserContext.index_select``.

Scores are sums of token log-probabilities (the sequence log-likelihood, no length normalisation), so the
returned ranking agrees with scoring every catalogue entry exhaustively whenever the beam is wide enough
to keep every prefix (tested on a tiny model). With ``log_scores=True`` the step function returns its own
token scores instead, e.g. :class:`ContrastiveStepper`'s log p(t | user) - w log p(t | no history).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from .utils.hf import cache_kwargs, new_cache, output_cache, step_mask

StepFn = Callable[[torch.Tensor, Any, torch.Tensor], tuple[torch.Tensor, Any]]
#: The catalogue decoders: this module's beam search, and exact best-first search (:mod:`userllm.best_first`).
DECODERS = ("beam", "exact")


class Trie:
    """Prefix trie over token sequences; each sequence is stored followed by ``eos_id``.

    Nodes are integers (0 = root). ``children[n]`` maps token -> child node; ``value[n]`` is the catalogue
    index of the entry that ends at ``n`` (only nodes reached by EOS carry one, else -1).
    """

    def __init__(self, sequences: Sequence[Sequence[int]], eos_id: int):
        self.eos_id = int(eos_id)
        self.children: list[dict[int, int]] = [{}]
        self.value: list[int] = [-1]
        self.max_len = 0
        for idx, seq in enumerate(sequences):
            seq = [int(t) for t in seq]
            if not seq:
                raise ValueError(f"Trie: entry {idx} has no tokens")
            if self.eos_id in seq:
                raise ValueError(f"Trie: entry {idx} contains the EOS token {self.eos_id}")
            node = 0
            for tok in seq + [self.eos_id]:
                nxt = self.children[node].get(tok)
                if nxt is None:
                    nxt = len(self.children)
                    self.children[node][tok] = nxt
                    self.children.append({})
                    self.value.append(-1)
                node = nxt
            if self.value[node] != -1:
                raise ValueError(f"Trie: entries {self.value[node]} and {idx} have the same tokens")
            self.value[node] = idx
            self.max_len = max(self.max_len, len(seq) + 1)
        self.size = len(sequences)

    @classmethod
    def from_texts(cls, texts: Sequence[str], tokenizer) -> "Trie":
        """Trie over ``tokenizer(text)`` (no special tokens) of each text; texts must be distinct."""
        ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        return cls(ids, tokenizer.eos_token_id)

    def allowed(self, node: int) -> list[int]:
        return list(self.children[node])

    def walk(self, tokens: Sequence[int]) -> int | None:
        """The node reached from the root by ``tokens``, or None when they leave the trie."""
        node = 0
        for t in tokens:
            node = self.children[node].get(int(t))
            if node is None:
                return None
        return node


@dataclass
class BeamSearchOutput:
    """Per example, the finished entries in descending score order (at most ``top_k`` each)."""

    entries: list[list[int]]   # catalogue indices
    scores: list[list[float]]  # summed token log-probs
    steps: int                 # decoder steps run


@torch.no_grad()
def constrained_beam_search(step_fn: StepFn, logits: torch.Tensor, past: Any, trie: Trie, num_beams: int = 10,
                            top_k: int | None = None, log_scores: bool = False) -> BeamSearchOutput:
    """Top ``top_k`` (default ``num_beams``) distinct catalogue entries per example.

    logits: [B, V] next-token logits after each example's prompt (from the prefill), past: its state.
    log_scores: ``logits`` and ``step_fn``'s outputs are already per-token scores, summed as they are
    (instead of their log-softmax). Such scores may rise along a sequence, so the search then runs until
    every beam has finished instead of stopping once ``top_k`` finished entries beat every live beam.
    """
    def token_scores(x: torch.Tensor) -> torch.Tensor:
        return x.float() if log_scores else F.log_softmax(x.float(), dim=-1)

    B, V = logits.shape
    K = int(num_beams)
    top_k = K if top_k is None else int(top_k)
    device = logits.device
    eos = trie.eos_id
    neg_inf = float("-inf")

    # Beam layout: flat index b * K + j. Initially only beam 0 of each example is alive (score 0); all
    # K beams read the prefill row b of ``past``.
    nodes = [0 if j == 0 else -1 for _ in range(B) for j in range(K)]
    scores = torch.full((B, K), neg_inf, device=device)
    scores[:, 0] = 0.0
    row_of_beam = torch.arange(B, device=device).repeat_interleave(K)
    logprobs = token_scores(logits).index_select(0, row_of_beam)  # [B*K, V]
    done: list[list[tuple[float, int]]] = [[] for _ in range(B)]
    finished = [False] * B
    steps = 0

    for _ in range(trie.max_len):
        # Mask every token the trie does not allow after each beam's prefix.
        rows, cols = [], []
        for i, n in enumerate(nodes):
            if n >= 0:
                kids = trie.children[n]
                rows.extend([i] * len(kids))
                cols.extend(kids)
        allowed = torch.zeros(B * K, V, dtype=torch.bool, device=device)
        if rows:
            allowed[torch.tensor(rows, device=device), torch.tensor(cols, device=device)] = True
        cand = (scores.view(-1, 1) + logprobs).masked_fill(~allowed, neg_inf).view(B, K * V)
        n_cand = min(2 * K, K * V)  # at most one EOS per beam, so 2K candidates hold >= K non-EOS ones
        top_scores, top_idx = cand.topk(n_cand, dim=1)
        top_scores, top_idx = top_scores.tolist(), top_idx.tolist()

        new_nodes, new_scores, new_tokens, parents = [], [], [], []
        for b in range(B):
            alive = 0
            if not finished[b]:
                for s, flat in zip(top_scores[b], top_idx[b]):
                    if s == neg_inf or alive == K:
                        break
                    j, tok = divmod(flat, V)
                    child = trie.children[nodes[b * K + j]][tok]
                    if tok == eos:
                        done[b].append((s, trie.value[child]))
                        continue
                    new_nodes.append(child)
                    new_scores.append(s)
                    new_tokens.append(tok)
                    parents.append(b * K + j)
                    alive += 1
            # Stop an example once its top_k finished entries beat every live beam (log-probabilities only
            # fall; other scores may rise, so those run until no beam is alive).
            if not finished[b]:
                best_alive = new_scores[len(new_scores) - alive] if alive else neg_inf
                if alive == 0 or (not log_scores and len(done[b]) >= top_k and
                                  best_alive <= sorted((d[0] for d in done[b]), reverse=True)[top_k - 1]):
                    finished[b] = True
                    del new_nodes[len(new_nodes) - alive:], new_scores[len(new_scores) - alive:]
                    del new_tokens[len(new_tokens) - alive:], parents[len(parents) - alive:]
                    alive = 0
            for _ in range(K - alive):  # dead slots: no allowed token, score -inf, any valid row
                new_nodes.append(-1)
                new_scores.append(neg_inf)
                new_tokens.append(eos)
                parents.append(b * K)
        if all(finished):
            break
        nodes = new_nodes
        scores = torch.tensor(new_scores, device=device).view(B, K)
        beam_idx = row_of_beam[torch.tensor(parents, device=device)]
        input_ids = torch.tensor(new_tokens, device=device, dtype=torch.long).view(B * K, 1)
        step_logits, past = step_fn(input_ids, past, beam_idx)
        steps += 1
        row_of_beam = torch.arange(B * K, device=device)
        logprobs = token_scores(step_logits)

    entries, out_scores = [], []
    for b in range(B):
        ranked = sorted(done[b], key=lambda d: -d[0])[:top_k]
        entries.append([e for _, e in ranked])
        out_scores.append([s for s, _ in ranked])
    return BeamSearchOutput(entries, out_scores, steps)


@torch.no_grad()
def greedy_decode(step_fn: StepFn, logits: torch.Tensor, past: Any, eos_id: int,
                  max_new_tokens: int = 32) -> list[list[int]]:
    """Unconstrained greedy decoding (ReviewG); returns the generated ids per example, without EOS."""
    B = logits.shape[0]
    out: list[list[int]] = [[] for _ in range(B)]
    done = torch.zeros(B, dtype=torch.bool, device=logits.device)
    beam_idx = torch.arange(B, device=logits.device)
    for step in range(max_new_tokens):
        tok = logits.argmax(dim=-1)
        tok = torch.where(done, torch.full_like(tok, eos_id), tok)
        for b, t in enumerate(tok.tolist()):
            if not done[b] and t != eos_id:
                out[b].append(t)
        done |= tok == eos_id
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        logits, past = step_fn(tok.view(B, 1), past, beam_idx)
    return out


def recall_from_beams(entries: Sequence[Sequence[int]], labels: Sequence[int], ks: Sequence[int] = (1, 5, 10)
                      ) -> dict[str, float]:
    """Recall@k: fraction of examples whose label entry is among their first k decoded entries."""
    n = max(len(labels), 1)
    return {f"recall@{k}": sum(int(lab in list(e)[:k]) for e, lab in zip(entries, labels)) / n for k in ks}


# --------------------------------------------------------------------------- plain Hugging Face models


@dataclass
class HFState:
    """Decoder state: KV cache, text attention mask [R, S], next position [R], user context (UserLLM)."""

    cache: Any
    attention_mask: torch.Tensor
    next_position: torch.Tensor
    context: Any = None  # the UserContext of a UserLLM (None for a plain LM)


def prefix_logits(run: Callable, past: HFState, rows: torch.Tensor, input_ids: torch.Tensor,
                  lengths: torch.Tensor) -> torch.Tensor:
    """Next-token logits float [n, V] after ``prompt[rows[i]] + input_ids[i, :lengths[i]]`` for n pairs at once.

    past: the prefill's state of the B prompts (not modified: its cache is copied before it is reordered);
    rows: int64 [n] prompt of each pair; input_ids: int64 [n, L] each pair's continuation, right padded;
    lengths: int64 [n] >= 1. The continuations are appended to the prompts' KV cache, so the prompt is never
    recomputed; the padded tail sits after each row's last real token and so cannot change its logits.
    ``run(input_ids, text_mask, positions, cache, ctx) -> (logits [n, L, V], cache)`` is the stepper's forward.
    """
    cache = copy.deepcopy(past.cache)
    cache.reorder_cache(rows)
    n, L = input_ids.shape
    steps = torch.arange(L, device=input_ids.device)
    mask = torch.cat([past.attention_mask.index_select(0, rows), (steps[None] < lengths[:, None]).long()], dim=1)
    positions = past.next_position.index_select(0, rows)[:, None] + steps[None]
    ctx = past.context.index_select(rows) if past.context is not None else None
    logits, _ = run(input_ids, mask, positions, cache, ctx)
    return logits[torch.arange(n, device=logits.device), lengths - 1]


class HFStepper:
    """``step_fn`` for a Hugging Face causal LM (used by the TextPrompt baseline).

    Prompts are LEFT-padded for generation (so every row's next token lands in the same column of the KV
    cache); position ids are counted over real tokens only, so padding does not shift positions.
    """

    def __init__(self, model):
        self.model = model

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, HFState]:
        """input_ids, attention_mask: [B, P] left-padded. Returns (logits [B, V], state)."""
        positions = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
        logits, cache = self._run(input_ids, attention_mask, positions, new_cache(self.model), None)
        return logits[:, -1], HFState(cache, attention_mask.long(), positions[:, -1] + 1)

    def _run(self, input_ids, text_mask, positions, cache, ctx):
        out = self.model(input_ids=input_ids, attention_mask=step_mask(cache, text_mask), position_ids=positions,
                         use_cache=True, **cache_kwargs(self.model, cache))
        return out.logits, output_cache(out)

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, past: HFState, beam_idx: torch.Tensor):
        cache = past.cache
        cache.reorder_cache(beam_idx)
        mask = past.attention_mask.index_select(0, beam_idx)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], input_ids.shape[1])], dim=1)
        pos = past.next_position.index_select(0, beam_idx)
        position_ids = pos[:, None] + torch.arange(input_ids.shape[1], device=pos.device)[None]
        logits, cache = self._run(input_ids, mask, position_ids, cache, None)
        return logits[:, -1], HFState(cache, mask, position_ids[:, -1] + 1)

    @torch.no_grad()
    def prefix_logits(self, past: HFState, rows: torch.Tensor, input_ids: torch.Tensor,
                      lengths: torch.Tensor) -> torch.Tensor:
        """See :func:`prefix_logits`; ``past`` is the prefill's state and is left as it was."""
        return prefix_logits(self._run, past, rows, input_ids, lengths)


class UserLLMStepper:
    """``step_fn`` for a :class:`~userllm.integration.UserLLM`: the HF stepper plus the user context.

    The user side is computed once at prefill (``prepare_user_context``: encoder, projection, Perceiver and,
    for cross-attention, every block's K/V) and follows the beams with ``UserContext.index_select``.
    Position ids: passed explicitly for cross-attention (left-padded prompts); the soft-prompt path derives
    them itself from its prefix + text mask.
    """

    def __init__(self, model):
        self.model = model
        self.softprompt = model.config.integration == "softprompt"

    def _run(self, input_ids, text_mask, positions, cache, ctx):
        kwargs = {} if self.softprompt else {"position_ids": positions}
        out = self.model(input_ids=input_ids, attention_mask=text_mask, user_context=ctx, past_key_values=cache,
                         use_cache=True, **kwargs)
        return out.logits, output_cache(out)

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, features: list[torch.Tensor],
                lengths: torch.Tensor) -> tuple[torch.Tensor, HFState]:
        """input_ids/attention_mask: [B, P] left padded; features/lengths: the encoder input of the B rows."""
        return self.prefill_context(input_ids, attention_mask, self.model.prepare_user_context(features, lengths))

    @torch.no_grad()
    def prefill_context(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        ctx) -> tuple[torch.Tensor, HFState]:
        """As :meth:`prefill`, from a user context already prepared (``UserLLM.prepare_user_context``)."""
        positions = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
        logits, cache = self._run(input_ids, attention_mask, positions, new_cache(self.model.llm), ctx)
        return logits[:, -1], HFState(cache, attention_mask.long(), positions[:, -1] + 1, ctx)

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, past: HFState, beam_idx: torch.Tensor):
        past.cache.reorder_cache(beam_idx)
        ctx = past.context.index_select(beam_idx)
        mask = past.attention_mask.index_select(0, beam_idx)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], input_ids.shape[1])], dim=1)
        pos = past.next_position.index_select(0, beam_idx)
        position_ids = pos[:, None] + torch.arange(input_ids.shape[1], device=pos.device)[None]
        logits, cache = self._run(input_ids, mask, position_ids, past.cache, ctx)
        return logits[:, -1], HFState(cache, mask, position_ids[:, -1] + 1, ctx)

    @torch.no_grad()
    def prefix_logits(self, past: HFState, rows: torch.Tensor, input_ids: torch.Tensor,
                      lengths: torch.Tensor) -> torch.Tensor:
        """See :func:`prefix_logits`; ``past`` is the prefill's state and is left as it was."""
        return prefix_logits(self._run, past, rows, input_ids, lengths)


class ContrastiveStepper:
    """``step_fn`` of a UserLLM scoring token t by log p(t | user) - ``weight`` * log p(t | no history), for
    ``constrained_beam_search(..., log_scores=True)``.

    Summed over a title this ranks entries by log p(title | user) - w log p(title | no history): w = 0 is the
    plain likelihood, w = 1 the pointwise mutual information between the title and the user's history. The
    LLM's own prior (what it writes for anyone: popular titles) is discounted, so what the user context adds
    decides the ranking (issue 14: the beams held 3-4 of the encoder's 10 candidates, popular titles the rest).
    The same model runs twice per step, the second time with the user context emptied (cross-attention only:
    a soft prompt has no per-row length to empty).
    """

    def __init__(self, model, weight: float):
        if model.config.integration != "xattn":
            raise ValueError("ContrastiveStepper: needs the cross-attention integration (kv_lengths = 0 is "
                             "'no history' there)")
        self.user = UserLLMStepper(model)
        self.weight = float(weight)

    def _combine(self, own: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(own.float(), dim=-1) - self.weight * F.log_softmax(prior.float(), dim=-1)

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, features: list[torch.Tensor],
                lengths: torch.Tensor) -> tuple[torch.Tensor, tuple[HFState, HFState]]:
        """As :meth:`UserLLMStepper.prefill`; returns (token scores float [B, V], (own state, prior state)).
        The encoder runs once: "no history" is the same context with ``kv_lengths`` = 0, as ``gain(none)`` of
        :mod:`userllm.diagnostics` scores it."""
        ctx = self.user.model.prepare_user_context(features, lengths)
        own, own_state = self.user.prefill_context(input_ids, attention_mask, ctx)
        prior, prior_state = self.user.prefill_context(input_ids, attention_mask, ctx.without_history())
        return self._combine(own, prior), (own_state, prior_state)

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, past: tuple[HFState, HFState], beam_idx: torch.Tensor):
        own, own_state = self.user(input_ids, past[0], beam_idx)
        prior, prior_state = self.user(input_ids, past[1], beam_idx)
        return self._combine(own, prior), (own_state, prior_state)


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists to ``(input_ids [B, P], attention_mask [B, P])``."""
    P = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), P), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), P), dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            ids[i, P - len(s):] = torch.tensor(list(s), dtype=torch.long)
            mask[i, P - len(s):] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def score_entries(model, prompt_ids: Sequence[int], entries: Sequence[Sequence[int]], eos_id: int) -> torch.Tensor:
    """Exhaustive log-likelihood of ``entry + [eos]`` after ``prompt_ids`` for every entry: float [N].

    The brute-force reference the beam search is tested against.
    """
    seqs = [list(prompt_ids) + list(e) + [eos_id] for e in entries]
    L = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), L, dtype=torch.long)
    mask = torch.zeros(len(seqs), L, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
    logp = F.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
    out = torch.zeros(len(seqs))
    P = len(prompt_ids)
    for i, s in enumerate(seqs):
        tgt = torch.tensor(s[P:])
        out[i] = logp[i, P - 1:len(s) - 1].gather(1, tgt[:, None]).sum()
    return out
