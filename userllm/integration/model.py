"""UserLLM: a Hugging Face causal LM contextualised with user embeddings (User-LLM, arXiv 2402.13598).

    features, lengths ──► encoder ──► [B, L, d_enc] ──► projection ──► [B, L, d_llm]
        ──► (optional Perceiver) ──► [B, M, d_llm] = user states, kv_lengths
    xattn:      gated cross-attention blocks before every k-th decoder layer read per-layer user K/V
    softprompt: [user states ; task prompt ; text] fed as ``inputs_embeds``

``d_llm`` is the width where the user tokens enter: the residual stream (``hidden_size``) for
cross-attention, the input-embedding width for the soft prompt (the two differ in OPT-350m).

The user side of a request is computed once (:meth:`UserLLM.prepare_user_context`): for cross-attention
that includes each block's K/V projection, which every decoding step then reuses.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
from torch import nn
from transformers import LogitsProcessor, LogitsProcessorList

from userllm.utils.hf import cache_kwargs, cached_tokens, forward_with_target_loss, is_empty, step_mask

from .cross_attention import CrossAttentionHook, GatedCrossAttentionBlock, attach_cross_attention
from .layers import (UserContext, UserProjection, find_decoder_layers, lengths_from_mask, llm_hidden_size,
                     llm_num_heads)
from .names import INTEGRATIONS
from .perceiver import PerceiverResampler
from .copy_head import CopyHook
from .readout import NextItemReadout, append_tokens, ids_after
from .soft_prompt import SoftPrompt, position_ids_from_mask, prepend



@dataclass
class UserLLMConfig:
    """How the user side enters the LLM.

    integration: "xattn" (gated cross-attention blocks) or "softprompt" (prefix tokens).
    xattn_every: a block before decoder layers 0, k, 2k, ... (ignored when ``xattn_layers`` is given).
    xattn_heads / xattn_kv_heads: query / K-V heads of the blocks (default: the LLM's head count; kv
        heads default to the query heads; fewer kv heads = grouped-query attention).
    gate_init: initial value of the blocks' tanh gates. 0 (Flamingo) leaves a pretrained LLM exactly as it
        was at init; a small positive value lets the blocks learn from the first step (with 0 their
        gradient is noise behind closed gates, which hardly open with a random LLM in a short run).
    perceiver_latents: 0 = no Perceiver; else the number of latent tokens the history is resampled to.
    task_prompt_len: learned task-prompt tokens after the user tokens (soft prompt only).
    readout_tokens: 0 = the paper's user tokens only; K > 0 also gives the LLM the encoder's K best
        next-item candidates as tokens (:mod:`userllm.integration.readout`; needs ``encoder.score_next``).
    readout_title_tokens: 0 = one readout token per candidate (its title's mean embedding); P > 0 = P per
        candidate, one per title token (:class:`~userllm.integration.readout.NextItemReadout`).
    readout_pointer: a pointer (copy) head that lets the LLM write a readout title token by pointing at it
        (:mod:`userllm.integration.copy_head`; needs cross-attention and ``readout_title_tokens`` > 0).
    """

    integration: str = "xattn"
    xattn_every: int = 1
    xattn_layers: tuple[int, ...] | None = None
    xattn_heads: int | None = None
    xattn_kv_heads: int | None = None
    xattn_ffn_mult: int = 4
    gate_init: float = 0.0
    perceiver_latents: int = 0
    perceiver_layers: int = 1
    perceiver_heads: int | None = None
    task_prompt_len: int = 8
    readout_tokens: int = 0
    readout_title_tokens: int = 0
    readout_pointer: bool = False
    dropout: float = 0.0

    def __post_init__(self):
        if self.integration not in INTEGRATIONS:
            raise ValueError(f"integration must be one of {INTEGRATIONS}, got {self.integration!r}")
        if self.xattn_every < 1:
            raise ValueError(f"xattn_every must be >= 1, got {self.xattn_every}")
        if self.perceiver_latents < 0 or self.perceiver_layers < 1:
            raise ValueError(f"perceiver needs latents >= 0 and layers >= 1, got {self.perceiver_latents}, "
                            f"{self.perceiver_layers}")
        if self.readout_tokens < 0:
            raise UserError(f"readout_tokens must be >= 0, got {self.readout_tokens}")
        if self.task_prompt_len < 0:
            raise ValueError(f"task_prompt_len must be >= 0, got {self.task_prompt_len}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {self.dropout}")
        if self.xattn_layers is not None:
            self.xattn_layers = tuple(int(i) for i in self.xattn_layers)
        if self.readout_pointer and (self.integration != "xattn" or not self.readout_tokens
                                  or not self.readout_title_tokens):
            raise ValueError("readout_pointer needs the xattn integration, readout_tokens > 0 and "
                             "readout_title_tokens > 0")


def _encoder_output(out) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(embeddings [B, L, d], mask [B, L] or None) from an EncoderOutput-like object or a tuple."""
    if hasattr(out, "embeddings"):
        return out.embeddings, getattr(out, "mask", None)
    if isinstance(out, (tuple, list)):
        return out[0], (out[1] if len(out) > 1 else None)
    return out, None


def _scored_vocab(encoder: nn.Module) -> int:
    """Size of the vocabulary ``encoder.score_next`` scores (the AR encoder's item feature, the dual
    encoder's label feature)."""
    name = getattr(encoder.config, "label_feature", "item")
    for spec in encoder.config.feature_specs:
        if spec.name == name:
            return int(spec.num_embeddings)
    raise ValueError(f"the encoder has no {name!r} feature to read next-item candidates from")


class _WithPrompt(LogitsProcessor):
    """Runs ``processor`` on prompt + generated ids when HF only tracks the generated ones."""

    def __init__(self, processor, prompt: torch.Tensor):
        self.processor, self.prompt = processor, prompt

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        prompt = self.prompt.repeat_interleave(input_ids.shape[0] // self.prompt.shape[0], dim=0)
        return self.processor(torch.cat([prompt.to(input_ids.device), input_ids], dim=1), scores)


def _heads_for(width: int, llm_heads: int | None) -> int:
    """Default attention heads at ``width``: the LLM's head count when it divides the width, else heads of 64."""
    if llm_heads and width % llm_heads == 0:
        return llm_heads
    return max(1, width // 64) if width % 64 == 0 else 1


def _checkpointing(llm: nn.Module) -> bool:
    """Whether HF gradient (activation) checkpointing is on (the property's name changed in 5.x)."""
    for attr in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(llm), attr):
            return bool(getattr(llm, attr))
    return False


def check_checkpointing(llm: nn.Module) -> None:
    """Refuse reentrant activation checkpointing where it would run the cross-attention hooks inside it.

    Older transformers (5.17) checkpoint a decoder layer's ``__call__``, so the forward pre-hook that adds the
    cross-attention runs inside the checkpoint; with ``use_reentrant=True`` the recomputation then
    backpropagates into the shared user K/V once per layer, and the second time fails ("Trying to backward
    through the graph a second time"). Newer ones (5.24) checkpoint ``forward`` and keep hooks outside.
    Non-reentrant checkpointing (HF's default) works with both."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    if "__call__" not in GradientCheckpointingLayer.__dict__:
        return
    for m in llm.modules():
        if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing:
            fn = getattr(m, "_gradient_checkpointing_func", None)
            if getattr(fn, "keywords", {}).get("use_reentrant", False):
                import transformers

                raise ValueError(f"reentrant activation checkpointing (use_reentrant=True) is not supported with "
                                 f"cross-attention on transformers {transformers.__version__}, which runs the "
                                 f"blocks' hooks inside the checkpoint: use use_reentrant=False (HF's default)")


class UserLLM(nn.Module):
    """A causal LM ``llm`` (any HF ``PreTrainedModel`` with a causal LM head) plus a user ``encoder``.

    encoder: any module with ``forward(features: list[Tensor], lengths: Tensor) -> EncoderOutput``
        (``embeddings`` [B, L, d_enc], ``mask`` [B, L] bool, right padded); its width is
        ``encoder.output_dim`` unless ``encoder_dim`` is given.

    Submodules (the parameter groups of :mod:`userllm.integration.strategies`): ``llm``, ``encoder``,
    ``projection``, ``perceiver`` (or None), ``xattn`` (ModuleList of blocks, empty for soft prompt),
    ``soft_prompt`` (or None), ``readout`` (or None).
    """

    def __init__(self, llm: nn.Module, encoder: nn.Module, config: UserLLMConfig | None = None,
                 encoder_dim: int | None = None):
        super().__init__()
        self.config = config = config or UserLLMConfig()
        self.llm = llm
        self.encoder = encoder
        d_enc = encoder_dim if encoder_dim is not None else getattr(encoder, "output_dim", None)
        if not isinstance(d_enc, int):
            raise ValueError("UserLLM needs the encoder width: give `encoder_dim` or an encoder with `output_dim`")
        # User tokens live where they enter the LLM: cross-attention adds to the residual stream (hidden_size);
        # a soft prompt is fed as inputs_embeds, whose width differs when the LLM projects its embeddings
        # (OPT-350m: word_embed_proj_dim 512, hidden_size 1024).
        d_res = llm_hidden_size(llm)
        d_llm = self.d_llm = d_res if config.integration == "xattn" else llm.get_input_embeddings().embedding_dim
        default_heads = _heads_for(d_llm, llm_num_heads(llm))
        self.projection = UserProjection(d_enc, d_llm, config.dropout)
        self.perceiver = None
        if config.perceiver_latents > 0:
            self.perceiver = PerceiverResampler(d_llm, config.perceiver_latents, config.perceiver_layers,
                                                config.perceiver_heads or default_heads,
                                                dropout=config.dropout)
        self.readout = None
        if config.readout_tokens > 0:
            if not hasattr(encoder, "score_next"):
                raise ValueError("readout tokens need an encoder with a next-item head (score_next)")
            self.readout = NextItemReadout(_scored_vocab(encoder), d_llm, config.readout_tokens,
                                           config.readout_title_tokens, copy=config.readout_pointer)
        self.xattn = nn.ModuleList()
        self.soft_prompt = None
        self.xattn_layer_indices: list[int] = []
        self._context: UserContext | None = None
        self._allow_expand = False
        if config.integration == "xattn":
            self.decoder_layers_path, layers = find_decoder_layers(llm)
            indices = list(config.xattn_layers) if config.xattn_layers is not None else list(
                range(0, len(layers), config.xattn_every))
            if not indices or any(not 0 <= i < len(layers) for i in indices) or len(set(indices)) != len(indices):
                raise ValueError(f"xattn layers {indices} are not distinct indices of the {len(layers)} decoder layers")
            heads = config.xattn_heads or default_heads
            for _ in indices:
                self.xattn.append(GatedCrossAttentionBlock(d_llm, heads, config.xattn_kv_heads,
                                                           ffn_mult=config.xattn_ffn_mult, dropout=config.dropout,
                                                           gate_init=config.gate_init))
            self.xattn_layer_indices = indices
            self._hook_handles = attach_cross_attention(layers, indices, lambda i: CrossAttentionHook(self, i))
            if self.readout is not None and self.readout.copy_head is not None:
                head = llm.get_output_embeddings()
                if head is None:
                    raise ValueError(f"{type(llm).__name__} has no output embedding for the readout's copy head")
                self._hook_handles.append(head.register_forward_hook(CopyHook(self, self.readout.copy_head)))
        else:
            std = float(llm.get_input_embeddings().weight.detach().float().std())
            self.soft_prompt = SoftPrompt(d_llm, config.task_prompt_len, init_std=std)

    # ------------------------------------------------------------------------------ train / eval
    def train(self, mode: bool = True) -> "UserLLM":
        """Like ``nn.Module.train``, but a fully frozen ``llm`` or ``encoder`` (no parameter requiring grad:
        strategies ``enc``/``proj``, a fixed encoder) stays in eval mode: its dropout is off and it computes
        what it computes at inference. Decided at each call, from ``requires_grad`` as set then.

        The one exception is activation checkpointing: HF checkpoints a decoder layer only while the layer
        itself is in training mode, so a checkpointing layer keeps ``training`` (its own flag only; its
        attention and MLP submodules, where the dropout is, are in eval mode)."""
        from transformers.modeling_layers import GradientCheckpointingLayer

        super().train(mode)
        if mode:
            for module in (self.llm, self.encoder):
                if not any(p.requires_grad for p in module.parameters()):
                    module.eval()
                    for m in module.modules():
                        if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing:
                            m.training = True
        return self

    # ----------------------------------------------------------------------------------- user side
    def encode_users(self, features: list[torch.Tensor], lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder -> projection -> (Perceiver) -> (readout). Returns user states [B, N', d_llm] and kv_lengths
        int64 [B]."""
        return self._encode_users(features, lengths)[:2]

    def _encode_users(self, features: list[torch.Tensor], lengths: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """:meth:`encode_users` plus the copy ids int64 [B, N'] of the readout's copy head (or None)."""
        emb, mask = _encoder_output(self.encoder(features, lengths))
        if mask is not None:
            kv_lengths = lengths_from_mask(mask)
        else:
            kv_lengths = lengths.to(device=emb.device, dtype=torch.int64).clamp(max=emb.shape[1])
        states = self.projection(emb.to(self.projection.net[0].weight.dtype))
        if self.perceiver is not None:
            states, kv_lengths = self.perceiver(states, kv_lengths)
        copy_ids = None
        if self.readout is not None:
            tokens, ids = self.readout.tokens_and_ids(self.encoder.score_next(features, lengths))
            before = kv_lengths
            states, kv_lengths = append_tokens(states, before, tokens)
            if ids is not None:
                copy_ids = ids_after(before, states.shape[1], ids)
        return states, kv_lengths, copy_ids

    def prepare_user_context(self, features: list[torch.Tensor], lengths: torch.Tensor, *,
                             cache_kv: bool = True) -> UserContext:
        """Everything about the users of a request, computed once: states, lengths and, for cross-attention
        with ``cache_kv``, each block's K/V projection (reused by every forward/decoding step)."""
        states, kv_lengths, copy_ids = self._encode_users(features, lengths)
        keys = values = None
        if self.config.integration == "xattn" and cache_kv:
            kv = [block.project_kv(states) for block in self.xattn]
            keys, values = tuple(k for k, _ in kv), tuple(v for _, v in kv)
        return UserContext(states, kv_lengths, keys, values, copy_ids)

    def _resolve_context(self, user_context, features, lengths, cache_kv: bool = True) -> UserContext | None:
        if user_context is not None:
            if features is not None:
                raise ValueError("give either user_context or features/lengths, not both")
            return user_context
        if features is None:
            return None
        if lengths is None:
            raise ValueError("features need their lengths")
        return self.prepare_user_context(features, lengths, cache_kv=cache_kv)

    # ------------------------------------------------------- the context read by the xattn hooks
    def context_for_batch(self, batch: int) -> UserContext | None:
        """The active user context for a decoder call on ``batch`` rows (called by the hooks).

        Inside :meth:`generate` a context of B rows serves B * n rows by ``repeat_interleave(n)`` (how HF
        expands inputs for beams / multiple return sequences), done once and kept. Beam reordering only
        permutes rows within a request's group, which all hold the same user, so it needs nothing more.
        """
        ctx = self._context
        if ctx is None or ctx.batch_size == batch:
            return ctx
        if self._allow_expand and batch % ctx.batch_size == 0:
            self._context = ctx = ctx.repeat_interleave(batch // ctx.batch_size)
            return ctx
        raise ValueError(f"user context has {ctx.batch_size} rows but the text batch has {batch}")

    @contextmanager
    def use_user_context(self, context: UserContext | None, allow_expand: bool = False, keep: bool = False):
        """Make ``context`` the one the cross-attention hooks read while the block runs.

        ``keep``: leave it set afterwards (needed when gradient checkpointing recomputes the layers
        during backward, after forward has returned).
        """
        saved = self._context, self._allow_expand
        self._context, self._allow_expand = context, allow_expand
        try:
            yield
        finally:
            if not keep:
                self._context, self._allow_expand = saved

    # --------------------------------------------------------------------------------- forward
    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                user_context: UserContext | None = None, features: list[torch.Tensor] | None = None,
                lengths: torch.Tensor | None = None, labels: torch.Tensor | None = None, past_key_values=None,
                use_cache: bool = False, inputs_embeds: torch.Tensor | None = None, **llm_kwargs):
        """The LLM's output: ``logits`` [B, T, V] aligned with the text tokens; with ``labels``, ``loss`` and the
        logits of the last K <= T text positions only, those from the one before the first target on
        (:func:`~userllm.utils.hf.forward_with_target_loss`).

        The user side comes from ``user_context`` (see :meth:`prepare_user_context`) or is computed from
        ``features``/``lengths``; with neither, the LLM runs without users (xattn blocks are skipped; the
        soft prompt holds only the task prompt). ``attention_mask``/``labels`` cover the text tokens only
        (past + current when ``past_key_values`` is given); the soft-prompt prefix is added here.
        """
        ctx = self._resolve_context(user_context, features, lengths)
        if self.config.integration == "softprompt":
            return self._forward_softprompt(input_ids, attention_mask, ctx, labels, past_key_values, use_cache,
                                            inputs_embeds, llm_kwargs)
        keep = self.training and _checkpointing(self.llm)
        if keep:
            check_checkpointing(self.llm)
        with self.use_user_context(ctx, keep=keep):
            return forward_with_target_loss(self.llm, labels, input_ids=input_ids,
                                            attention_mask=step_mask(past_key_values, attention_mask),
                                            use_cache=use_cache, inputs_embeds=inputs_embeds,
                                            **cache_kwargs(self.llm, past_key_values), **llm_kwargs)

    def _prefix(self, ctx: UserContext | None, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        if ctx is not None and ctx.batch_size != batch:
            raise ValueError(f"user context has {ctx.batch_size} rows but the text batch has {batch}")
        return self.soft_prompt.build_prefix(None if ctx is None else ctx.states,
                                             None if ctx is None else ctx.kv_lengths, batch)

    def _text_embeds(self, input_ids, inputs_embeds):
        if inputs_embeds is not None:
            return inputs_embeds
        if input_ids is None:
            raise ValueError("give input_ids or inputs_embeds")
        return self.llm.get_input_embeddings()(input_ids)

    def _forward_softprompt(self, input_ids, attention_mask, ctx, labels, past_key_values, use_cache,
                            inputs_embeds, llm_kwargs):
        embeds = self._text_embeds(input_ids, inputs_embeds)
        B, T = embeds.shape[:2]
        if ctx is not None and ctx.batch_size != B:
            raise ValueError(f"user context has {ctx.batch_size} rows but the text batch has {B}")
        past = 0 if past_key_values is None else cached_tokens(past_key_values)
        if past is None:  # a recurrent state (Mamba) counts no tokens: the text mask says how many came before
            if attention_mask is None:
                raise ValueError(f"{type(self.llm).__name__} keeps a recurrent state, not tokens: decoding with "
                                 "its cache needs the attention_mask of the past and new text tokens")
            past = 0 if is_empty(past_key_values) else (
                (0 if ctx is None else ctx.states.shape[1]) + self.config.task_prompt_len + attention_mask.shape[1] - T)
        if past == 0:
            prefix, prefix_mask = self._prefix(ctx, B)
            S = prefix.shape[1]
            embeds, mask, labels, position_ids = prepend(prefix, prefix_mask, embeds, attention_mask, labels)
        else:
            # A decoding step: the prefix is already in the cache; only its mask columns are added.
            prefix_mask = self.soft_prompt.prefix_mask(None if ctx is None else ctx.kv_lengths,
                                                       0 if ctx is None else ctx.states.shape[1], B)
            S = prefix_mask.shape[1]
            if attention_mask is None:
                attention_mask = torch.ones(B, past - S + T, dtype=torch.int64, device=embeds.device)
            mask = torch.cat([prefix_mask.to(attention_mask.device), attention_mask.to(torch.int64)], dim=1)
            if mask.shape[1] != past + T:
                raise ValueError(f"attention_mask covers {attention_mask.shape[1]} text tokens; expected "
                                 f"{past - S + T} (cache {past} incl. a {S}-token prefix, plus {T} new)")
            position_ids = position_ids_from_mask(mask)[:, -T:]
        out = forward_with_target_loss(self.llm, labels, inputs_embeds=embeds,
                                       attention_mask=step_mask(past_key_values, mask), position_ids=position_ids,
                                       use_cache=use_cache, **cache_kwargs(self.llm, past_key_values), **llm_kwargs)
        # the text's positions only: the prefix's (all S without labels; its last one with labels from text
        # column 0) are not returned
        if past == 0 and getattr(out, "logits", None) is not None and out.logits.shape[1] > T:
            out.logits = out.logits[:, -T:]
        return out

    # ------------------------------------------------------------------------------- generation
    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 user_context: UserContext | None = None, features: list[torch.Tensor] | None = None,
                 lengths: torch.Tensor | None = None, cache_user_kv: bool = True, **generate_kwargs):
        """Hugging Face ``generate`` (greedy, sampling, beam search, ...) with the users in context.

        Returns what HF returns, with sequences = prompt + new tokens for both integrations (and
        ``prefix_allowed_tokens_fn`` / ``logits_processor`` see prompt + new tokens for both). With
        cross-attention the user K/V are projected once here (``cache_user_kv``) and reused by every
        step; ``cache_user_kv=False`` re-projects them at every step (the reference to compare against).
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        ctx = self._resolve_context(user_context, features, lengths, cache_kv=cache_user_kv)
        if self.config.integration == "xattn":
            if ctx is not None and ctx.cached and not cache_user_kv:
                ctx = replace(ctx, keys=None, values=None)
            with self.use_user_context(ctx, allow_expand=True):
                return self.llm.generate(input_ids=input_ids, attention_mask=attention_mask, **generate_kwargs)
        embeds = self._text_embeds(input_ids, None)
        prefix, prefix_mask = self._prefix(ctx, input_ids.shape[0])
        embeds, mask, _, _ = prepend(prefix, prefix_mask, embeds, attention_mask)
        # HF's running ids hold only the new tokens on this path; constraints see prompt + new tokens, as
        # with cross-attention (and plain HF), so a constrained decoder works the same for both.
        fn = generate_kwargs.get("prefix_allowed_tokens_fn")
        if fn is not None:
            generate_kwargs["prefix_allowed_tokens_fn"] = lambda b, sent: fn(b, torch.cat([input_ids[b], sent]))
        if generate_kwargs.get("logits_processor"):
            generate_kwargs["logits_processor"] = LogitsProcessorList(
                _WithPrompt(p, input_ids) for p in generate_kwargs["logits_processor"])
        out = self.llm.generate(inputs_embeds=embeds, attention_mask=mask, **generate_kwargs)
        # From inputs_embeds alone HF returns only the new tokens: put the prompt back in front.
        sequences = out if isinstance(out, torch.Tensor) else out.sequences
        prompt = input_ids.repeat_interleave(sequences.shape[0] // input_ids.shape[0], dim=0)
        sequences = torch.cat([prompt, sequences], dim=1)
        if isinstance(out, torch.Tensor):
            return sequences
        out.sequences = sequences
        return out

    def num_prefix_tokens(self, n_events: int) -> int:
        """LLM context tokens the user side adds for a history of ``n_events`` (0 for cross-attention)."""
        if self.config.integration == "xattn":
            return 0
        n_user = self.perceiver.n_latents if self.perceiver is not None else n_events
        readout = self.readout.tokens_per_request if self.readout is not None else 0    # K x max(1, P)
        return n_user + readout + self.config.task_prompt_len
