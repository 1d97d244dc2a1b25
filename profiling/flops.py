"""FLOPs: analytic estimates and measured counts, broken down by component.

Conventions (the same as :mod:`torch.utils.flop_counter`, so analytic and measured agree exactly for
plain blocks):

* a matmul ``[m, k] @ [k, n]`` costs ``2 m k n`` FLOPs; a Linear layer's bias, norms, activations,
  softmax and embedding lookups are not counted (they are O(elements), not O(elements x width));
* attention of ``Tq`` queries over ``Tk`` keys with ``H`` query heads of width ``D`` costs
  ``4 B H Tq Tk D`` (``QK^T`` and ``PV``), the full rectangle even when causal, as the fused kernels'
  counters do;
* backward costs twice the forward (gradients w.r.t. inputs and weights), so a training step is
  ``3x`` the forward: the paper's ``6 N D`` (``2 N`` per token forward, ``4 N`` backward); a fused
  attention kernel's backward also recomputes ``Q K^T``, so its backward is 2.5x its forward.

Analytic (the paper's 6ND-style estimate, plus attention terms), per component of User-LLM:
    * ``llm``: ``2 N_llm T`` + ``4 n_layers T ctx d_attn`` over the LLM's input tokens ``T``;
    * ``encoder``: the same over the user's events;
    * ``perceiver``: latents attending to the events;
    * ``readout``: the encoder's next-item scoring of the candidates (no gradient), the candidates' title
      tokens (their adapters) and the pointer head on every position the LM head computes; the readout's
      ``K x max(1, P)`` tokens join the user tokens the cross-attention reads;
    * ``cross_attention``: text queries x user keys (K/V projections once per request).

Measured: :class:`ComponentFlopCounter` is a :class:`torch.utils.flop_counter.FlopCounterMode` (its
formulas and per-module table) that also attributes every counted op to a *component* — the innermost
registered module running it. Forward ops are attributed with module hooks; backward ops through the
autograd node running them (``torch._C._current_autograd_node``), whose metadata is tagged with the
component that created it during the forward. So the backward of the encoder is counted as encoder
even though it runs after the LLM's backward.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import torch
import torch.nn as nn
from torch.utils import flop_counter as _fc
from torch.utils.flop_counter import FlopCounterMode

from userllm.utils.hf import kept_positions, keeps_logits

aten = torch.ops.aten

OTHER = "other"               # ops outside every registered component (loss, glue code)
_TAG = "userllm_flops_component"


# --------------------------------------------------------------------------------------------------
# Analytic primitives
# --------------------------------------------------------------------------------------------------
def linear_flops(rows: int, in_features: int, out_features: int) -> int:
    """Forward FLOPs of ``x [rows, in] @ W^T [in, out]`` (bias not counted)."""
    return 2 * int(rows) * int(in_features) * int(out_features)


def attention_flops(batch: int, heads: int, q_len: int, kv_len: int, head_dim: int,
                    head_dim_v: int | None = None) -> int:
    """Forward FLOPs of ``softmax(Q K^T) V`` over query heads (GQA heads are broadcast, full rectangle)."""
    dv = head_dim if head_dim_v is None else head_dim_v
    return 2 * batch * heads * q_len * kv_len * head_dim + 2 * batch * heads * q_len * kv_len * dv


def linear_params(modules: nn.Module | Iterable[nn.Module], exclude: Iterable[nn.Module] = ()) -> int:
    """Sum of ``in x out`` over the Linear layers (and HF GPT-2 ``Conv1D``) in ``modules``.

    Modules in ``exclude`` (and their children) are skipped: e.g. cross-attention blocks living inside
    the LLM, counted as their own component.
    """
    if isinstance(modules, nn.Module):
        modules = [modules]
    skip = {id(m) for ex in exclude for m in ex.modules()}
    seen: set[int] = set()
    total = 0
    for root in modules:
        for m in root.modules():
            if id(m) in skip or id(m) in seen:
                continue
            seen.add(id(m))
            if isinstance(m, nn.Linear):
                total += m.in_features * m.out_features
            elif type(m).__name__ == "Conv1D" and hasattr(m, "nf"):    # transformers.pytorch_utils.Conv1D
                total += m.weight.shape[0] * m.weight.shape[1]
    return total


@dataclass
class FlopBreakdown:
    """FLOPs per component (``{name: flops}``) with helpers; ``total`` sums them."""

    components: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return int(sum(self.components.values()))

    def __getitem__(self, name: str) -> int:
        return int(self.components.get(name, 0))

    def scaled(self, factor: float) -> "FlopBreakdown":
        return FlopBreakdown({k: int(round(v * factor)) for k, v in self.components.items()})

    def __add__(self, other: "FlopBreakdown") -> "FlopBreakdown":
        keys = list(dict.fromkeys([*self.components, *other.components]))
        return FlopBreakdown({k: self[k] + other[k] for k in keys})

    def to_dict(self) -> dict[str, int]:
        return {**{k: int(v) for k, v in self.components.items()}, "total": self.total}


# --------------------------------------------------------------------------------------------------
# Analytic models of the components
# --------------------------------------------------------------------------------------------------
@dataclass
class TransformerShape:
    """What the 6ND estimate needs of a Transformer stack.

    n_params_matmul: sum of in x out of the Linear layers applied to every token (incl. an LM head);
    n_layers, d_attn (= query heads x head dim): for the attention term;
    fused_attention: attention runs as one fused SDPA kernel whose backward recomputes ``Q K^T``
    (5 matmuls: 2.5x the forward, torch's counting); otherwise it is plain matmuls (backward 2x).
    """

    n_params_matmul: int
    n_layers: int
    d_attn: int
    fused_attention: bool = True

    def linear_forward(self, batch: int, q_len: int) -> int:
        return 2 * self.n_params_matmul * batch * q_len

    def attention_forward(self, batch: int, q_len: int, ctx: int | None = None) -> int:
        ctx = q_len if ctx is None else ctx
        return self.n_layers * attention_flops(batch, 1, q_len, ctx, self.d_attn)

    def forward(self, batch: int, q_len: int, ctx: int | None = None) -> int:
        """Forward FLOPs of ``batch`` sequences of ``q_len`` new tokens attending to ``ctx`` positions
        (``ctx = q_len`` for a prefill/training pass, ``past + 1`` for one decode step)."""
        return self.linear_forward(batch, q_len) + self.attention_forward(batch, q_len, ctx)

    def backward(self, batch: int, q_len: int) -> int:
        attn_factor = 2.5 if self.fused_attention else 2.0
        return 2 * self.linear_forward(batch, q_len) + int(attn_factor * self.attention_forward(batch, q_len))

    def train(self, batch: int, q_len: int) -> int:
        """Forward + backward of one training pass: ~``6 N D`` plus the attention terms."""
        return self.forward(batch, q_len) + self.backward(batch, q_len)

    def generate(self, batch: int, prompt_len: int, new_tokens: int) -> tuple[int, list[int]]:
        """(prefill FLOPs, [FLOPs of each later decode step]) with a KV cache: the prefill yields the
        first new token; step i (1-based) feeds one token attending to ``prompt_len + i`` positions."""
        prefill = self.forward(batch, prompt_len)
        steps = [self.forward(batch, 1, prompt_len + i) for i in range(1, new_tokens)]
        return prefill, steps


def hf_transformer_shape(llm: nn.Module, exclude: Iterable[nn.Module] = ()) -> TransformerShape:
    """:class:`TransformerShape` of a Hugging Face causal LM, read from its config and modules.

    The LM head is applied to every position in a forward pass, so it is part of the 2N term (tied or
    not). Token embeddings are lookups (0 FLOPs).
    """
    cfg = llm.config
    n_layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer")
    n_heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head")
    hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd")
    head_dim = getattr(cfg, "head_dim", None) or hidden // n_heads
    fused = getattr(cfg, "_attn_implementation", "sdpa") != "eager"
    return TransformerShape(linear_params(llm, exclude=exclude), int(n_layers), int(n_heads * head_dim), fused)


def encoder_shape(encoder: nn.Module) -> TransformerShape:
    """:class:`TransformerShape` of a user encoder's forward path (event projection + Transformer blocks).

    Heads used only by the pretraining loss (``head_proj``) are not part of the forward pass. Works for
    the autoregressive encoder and the dual encoder's user tower (modules named ``embed`` and
    ``transformer``); otherwise every Linear counts.
    """
    cfg = getattr(encoder, "config", None)
    parts = [getattr(encoder, n) for n in ("embed", "transformer") if isinstance(getattr(encoder, n, None), nn.Module)]
    n_params = linear_params(parts) if parts else linear_params(encoder)
    n_layers = int(getattr(cfg, "n_layers", 0) or 0)
    d_attn = int(getattr(cfg, "d_model", 0) or 0)
    return TransformerShape(n_params, n_layers, d_attn)


# --------------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------------
def _sdpa_cpu_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return _fc.sdpa_flop_count(query_shape, key_shape, value_shape)


def _sdpa_cpu_backward_flop(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                            **kwargs) -> int:
    return _fc.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def _fused_attention_flop(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    """Triton cached/latent cross-attention forward: q [B, T, Hq, D] (latents may be [M, H, D]) over
    k, v [B, N, Hkv, D]; counted as SDPA with the KV heads repeated to Hq (what the math does)."""
    B, N = k_shape[0], k_shape[1]
    T, Hq, D = q_shape[-3], q_shape[-2], q_shape[-1]
    return _fc.sdpa_flop_count((B, Hq, T, D), (B, Hq, N, D), (B, Hq, N, D))


def _fused_attention_backward_flop(grad_shape, q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    B, T, Hq, D = grad_shape
    N = k_shape[1]
    return _fc.sdpa_backward_flop_count((B, Hq, T, D), (B, Hq, T, D), (B, Hq, N, D), (B, Hq, N, D))


# The Triton ops of userllm.kernels (registered when their modules load, i.e. on first CUDA use).
_FUSED_ATTENTION_OPS = {
    "triton_cached_cross_attention": _fused_attention_flop,
    "triton_latent_cross_attention": _fused_attention_flop,
    "triton_cached_cross_attention_backward": _fused_attention_backward_flop,
    "triton_latent_cross_attention_backward": _fused_attention_backward_flop,
}


def extra_flop_formulas() -> dict[Any, Any]:
    """Formulas torch's registry lacks: the CPU fused SDPA kernel (what ``F.scaled_dot_product_attention``
    dispatches to on CPU) and its backward, and the Triton attention ops of :mod:`userllm.kernels`.
    Without them attention on CPU, or through the fused kernels, would count as 0 FLOPs."""
    out: dict[Any, Any] = {}
    for name, formula in _FUSED_ATTENTION_OPS.items():
        if hasattr(torch.ops.userllm, name):
            out[getattr(torch.ops.userllm, name)] = formula
    fwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    bwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if fwd is not None and fwd not in _fc.flop_registry:
        out[fwd] = _sdpa_cpu_flop
    if bwd is not None and bwd not in _fc.flop_registry:
        out[bwd] = _sdpa_cpu_backward_flop
    return out


def _tensors(obj) -> list[torch.Tensor]:
    flat, _ = torch.utils._pytree.tree_flatten(obj)
    out = [x for x in flat if isinstance(x, torch.Tensor)]
    # HF ModelOutput / dataclasses are not pytree nodes everywhere: look inside their values too
    for x in flat:
        if hasattr(x, "__dataclass_fields__") or hasattr(x, "to_tuple"):
            try:
                vals = x.to_tuple() if hasattr(x, "to_tuple") else [getattr(x, f) for f in x.__dataclass_fields__]
            except Exception:
                continue
            out.extend(_tensors(list(vals)))
    return out


def _tag_graph(tensors: Sequence[torch.Tensor], name: str) -> None:
    """Tag every not-yet-tagged autograd node reachable from ``tensors`` with component ``name``.

    Stops at tagged nodes, so each node is visited once: nodes created by an earlier component were
    tagged when that component returned, so only the nodes created since are claimed.
    """
    stack = [t.grad_fn for t in tensors if t.grad_fn is not None]
    while stack:
        node = stack.pop()
        md = node.metadata
        if _TAG in md:
            continue
        md[_TAG] = name
        stack.extend(n for n, _ in node.next_functions if n is not None)


class ComponentFlopCounter(FlopCounterMode):
    """:class:`FlopCounterMode` that also sums FLOPs per component and per phase (forward/backward).

    components: ``{name: module or [modules]}``; an op belongs to the innermost registered module on the
    stack when it runs (a cross-attention block inside the LLM is its own component), else ``"other"``.

        with ComponentFlopCounter({"llm": llm, "encoder": enc}) as fc:
            loss = model(batch); loss.backward()
        fc.component_flops()   # {"llm": {"forward": ..., "backward": ...}, "encoder": {...}, ...}
    """

    def __init__(self, components: Mapping[str, nn.Module | Sequence[nn.Module]] | None = None,
                 custom_mapping: dict[Any, Any] | None = None,
                 methods: Mapping[str, Sequence[tuple[Any, str]]] | None = None) -> None:
        super().__init__(display=False, custom_mapping={**extra_flop_formulas(), **(custom_mapping or {})})
        self.components: dict[str, list[nn.Module]] = {}
        for name, mods in (components or {}).items():
            if mods is None:
                continue
            self.components[name] = [mods] if isinstance(mods, nn.Module) else [m for m in mods if m is not None]
        # {component: [(object, "method")]}: methods other than forward that run a component's work
        # (e.g. a cross-attention block's project_kv, called once per request outside its forward).
        self.methods = {k: list(v) for k, v in (methods or {}).items()}
        self._patched: list[tuple[Any, str, bool]] = []
        self._by_phase: dict[str, dict[str, int]] = defaultdict(lambda: {"forward": 0, "backward": 0})
        self._stack: list[str] = []
        self._handles: list[Any] = []

    # -- hooks ---------------------------------------------------------------------------------
    def _pre_hook(self, name):
        def hook(module, args, kwargs):
            # Nodes made so far by the enclosing code belong to the enclosing component (or "other").
            _tag_graph([t for t in _tensors((args, kwargs)) if t.requires_grad],
                       self._stack[-1] if self._stack else OTHER)
            self._stack.append(name)
        return hook

    def _post_hook(self, name):
        def hook(module, args, kwargs, output):
            _tag_graph([t for t in _tensors(output) if t.requires_grad], name)
            if self._stack and self._stack[-1] == name:
                self._stack.pop()
        return hook

    def _wrap_method(self, name, fn):
        pre, post = self._pre_hook(name), self._post_hook(name)

        def wrapper(*args, **kwargs):
            pre(None, args, kwargs)
            try:
                out = fn(*args, **kwargs)
            except BaseException:
                self._stack.pop()
                raise
            post(None, args, kwargs, out)
            return out
        return wrapper

    def __enter__(self):
        self._by_phase.clear()
        self._stack = []
        for name, mods in self.components.items():
            for m in mods:
                self._handles.append(m.register_forward_pre_hook(self._pre_hook(name), with_kwargs=True))
                self._handles.append(m.register_forward_hook(self._post_hook(name), with_kwargs=True))
        for name, targets in self.methods.items():
            for obj, attr in targets:
                had_own = attr in vars(obj)
                self._patched.append((obj, attr, had_own, vars(obj).get(attr)))
                setattr(obj, attr, self._wrap_method(name, getattr(obj, attr)))
        return super().__enter__()

    def __exit__(self, *args):
        try:
            return super().__exit__(*args)
        finally:
            for h in self._handles:
                h.remove()
            self._handles.clear()
            for obj, attr, had_own, old in reversed(self._patched):
                if had_own:
                    setattr(obj, attr, old)
                else:
                    delattr(obj, attr)
            self._patched.clear()

    # -- counting ------------------------------------------------------------------------------
    def _count_flops(self, func_packet, out, args, kwargs):
        formula = self.flop_registry.get(func_packet)
        if formula is None:
            return out
        flops = formula(*args, **kwargs, out_val=out)
        for parent in set(self.mod_tracker.parents):
            self.flop_counts[parent][func_packet] += flops
        if torch._C._current_graph_task_id() != -1:          # inside loss.backward()
            node = torch._C._current_autograd_node()
            comp = node.metadata.get(_TAG, OTHER) if node is not None else OTHER
            self._by_phase[comp]["backward"] += flops
        else:
            self._by_phase[self._stack[-1] if self._stack else OTHER]["forward"] += flops
        return out

    def component_flops(self) -> dict[str, dict[str, int]]:
        """``{component: {"forward": F, "backward": B, "total": F + B}}`` (only components that ran ops)."""
        return {k: {**v, "total": v["forward"] + v["backward"]} for k, v in self._by_phase.items()}

    def breakdown(self, phase: str = "total") -> FlopBreakdown:
        """FLOPs per component for ``phase`` in {"forward", "backward", "total"}."""
        return FlopBreakdown({k: v[phase] for k, v in self.component_flops().items()})


def count_flops(fn, components: Mapping[str, nn.Module | Sequence[nn.Module]] | None = None,
                methods: Mapping[str, Sequence[tuple[Any, str]]] | None = None) -> tuple[Any, ComponentFlopCounter]:
    """Run ``fn()`` under a :class:`ComponentFlopCounter`; returns ``(fn's result, counter)``."""
    with ComponentFlopCounter(components, methods=methods) as counter:
        result = fn()
    return result, counter


COMPONENTS = ("llm", "encoder", "projection", "perceiver", "readout", "cross_attention")


def model_components(model: nn.Module) -> tuple[dict[str, Any], dict[str, list[tuple[Any, str]]]]:
    """``(components, methods)`` for :class:`ComponentFlopCounter` of a UserLLM or a plain HF LLM.

    UserLLM (anything with ``llm`` and ``encoder`` attributes): ``llm``, ``encoder``, ``projection``,
    ``perceiver``, ``readout`` (its ``tokens_and_ids``, the encoder's ``score_next`` that feeds it, and the
    pointer head, which runs inside the LLM's output head), ``cross_attention`` (the gated blocks, which run
    inside the LLM's decoder layers, and their ``project_kv``, which runs once per request). A plain LLM (the
    TextPrompt baseline) is all ``llm``.
    """
    if hasattr(model, "llm") and hasattr(model, "encoder"):
        blocks = list(getattr(model, "xattn", None) or [])
        readout = getattr(model, "readout", None)
        comps = {"llm": model.llm, "encoder": model.encoder, "projection": getattr(model, "projection", None),
                 "perceiver": getattr(model, "perceiver", None),
                 "readout": [readout.copy_head] if readout is not None and readout.copy_head is not None else [],
                 "cross_attention": blocks}
        methods = {"cross_attention": [(b, "project_kv") for b in blocks if hasattr(b, "project_kv")]}
        if readout is not None:
            methods["readout"] = [(readout, "tokens_and_ids"), (model.encoder, "score_next")]
        return {k: v for k, v in comps.items() if v is not None and v != []}, methods
    return {"llm": model}, {}


def flops_summary(counter: ComponentFlopCounter) -> dict[str, Any]:
    """JSON-ready summary: total, per component and phase, and the top-level per-module table."""
    return {
        "total": int(counter.get_total_flops()),
        "components": counter.component_flops(),
        "by_module": {k: int(sum(v.values())) for k, v in counter.get_flop_counts().items()
                      if k != "Global" and k.count(".") <= 2},
    }


def as_dict(shape: TransformerShape) -> dict[str, int]:
    return asdict(shape)


# --------------------------------------------------------------------------------------------------
# Analytic model of UserLLM / TextPrompt
# --------------------------------------------------------------------------------------------------
@dataclass
class PassShape:
    """Shapes of one pass: ``batch`` rows, ``text_len`` new LLM tokens per row (padded), ``n_events``
    user events per row (padded; 0 = no user side: TextPrompt), ``past`` cached LLM positions (decode)."""

    batch: int
    text_len: int
    n_events: int = 0
    past: int = 0


def _perceiver_forward(p: nn.Module, batch: int, n_events: int) -> tuple[int, int]:
    """(linear FLOPs, attention FLOPs) of a PerceiverResampler over ``n_events`` padded events."""
    M = p.n_latents
    lin = att = 0
    for i, layer in enumerate(p.layers):
        d = layer.k_proj.in_features
        lin += linear_flops(batch * n_events, d, layer.k_proj.out_features)
        lin += linear_flops(batch * n_events, d, layer.v_proj.out_features)
        # layer 0 projects the batch-shared latents [M, d] once; later layers see [B, M, d]
        lin += linear_flops(M if i == 0 else batch * M, d, layer.q_proj.out_features)
        lin += linear_flops(batch * M, layer.o_proj.in_features, layer.o_proj.out_features)
        lin += 2 * batch * M * linear_params(layer.ffn)
        att += attention_flops(batch, 1, M, n_events, layer.n_heads * layer.head_dim)
    return lin, att


def _score_next_forward(encoder: nn.Module, batch: int, n_events: int, num_items: int) -> int:
    """Forward FLOPs of ``encoder.score_next`` over ``n_events`` padded events, scoring ``num_items`` ids.

    Exact for the autoregressive encoder (``last_hidden``: every block but the last over all events, the
    last one's output projection and MLP at the last event only; then ``head_proj`` and the [B, D] x [D, V]
    product); for other encoders, an estimate: a full forward and a ``d_model`` x V product.
    """
    shape = encoder_shape(encoder)
    att = shape.attention_forward(batch, n_events)
    head = getattr(encoder, "head_proj", None)
    blocks = getattr(getattr(encoder, "transformer", None), "blocks", None)
    if head is None or not blocks or not hasattr(encoder, "last_hidden"):
        return shape.linear_forward(batch, n_events) + att + linear_flops(batch, encoder.output_dim, num_items)
    last = blocks[-1]
    at_last = linear_params([last.attn.out, last.mlp])                 # run at the last event only
    proj = head["item"]
    return (2 * batch * n_events * (shape.n_params_matmul - at_last) + 2 * batch * at_last + att
            + linear_flops(batch, proj.in_features, proj.out_features)
            + linear_flops(batch, proj.out_features, num_items))


def _copy_head_forward(head: nn.Module, batch: int, rows: int, n_user: int) -> int:
    """Forward FLOPs of the pointer head (:class:`~userllm.integration.copy_head.CopyHead`) on ``rows``
    positions per row over ``n_user`` user tokens: its query and gate on the positions, its key on the user
    tokens (recomputed on every call, decode steps included), and the ``rows x n_user`` pointer scores."""
    d, dk = head.query.in_features, head.query.out_features
    return (linear_flops(batch * rows, d, dk) + linear_flops(batch * n_user, d, dk)
            + linear_flops(batch * rows, d, 1) + 2 * batch * rows * n_user * dk)


def analytic_userllm(model: nn.Module, shape: PassShape, *, phase: str = "forward", user_side: bool = True,
                     cache_kv: bool = True, last_logits_only: bool = False,
                     head_from: int | None = None) -> FlopBreakdown:
    """Analytic FLOPs per component of one pass of a UserLLM (or of a plain HF LLM: TextPrompt).

    phase: "forward" (prefill/inference), "train" (forward + backward, every parameter trainable), or
    "decode" (one new token per row attending to ``past + 1`` positions; the user side was prepared at
    prefill, so only the cross-attention queries run — plus the K/V projections when not ``cache_kv``).
    user_side: run the encoder/projection/Perceiver/K-V projections in this pass (prefill, training).
    last_logits_only: the LM head runs on the last position only (what HF ``generate`` does at prefill).
    head_from: a training pass's first target column of the text (``userllm.utils.hf.first_target`` of its
    labels): the LM head then runs from the position before it on, as the training loss computes it
    (``forward_with_target_loss``, for LLMs that take ``logits_to_keep``); None: on every position.
    The reference attention ops (Perceiver, cross-attention) are plain matmuls: backward 2x; the LLM's
    SDPA backward is 2.5x (recomputed scores), see :class:`TransformerShape`.
    """
    if phase not in ("forward", "train", "decode"):
        raise ValueError(f"phase must be forward, train or decode, got {phase!r}")
    B, T, L = shape.batch, shape.text_len, shape.n_events
    is_user = hasattr(model, "llm") and hasattr(model, "encoder")
    llm = model.llm if is_user else model
    blocks = list(getattr(model, "xattn", None) or []) if is_user else []
    llm_shape = hf_transformer_shape(llm, exclude=blocks)
    train = phase == "train"
    out: dict[str, int] = {}

    def add(name: str, lin: int, att: int, attn_bwd: float = 2.0) -> None:
        total = lin + att
        if train:
            total += 2 * lin + int(attn_bwd * att)
        out[name] = out.get(name, 0) + total

    prefix = 0
    n_user = L
    readout = getattr(model, "readout", None) if is_user else None
    if is_user and L > 0:
        if model.perceiver is not None:
            n_user = model.perceiver.n_latents
        if readout is not None:
            n_user += readout.tokens_per_request
        if model.config.integration == "softprompt":
            prefix = n_user + model.config.task_prompt_len
        if user_side and phase != "decode":
            enc = encoder_shape(model.encoder)
            add("encoder", enc.linear_forward(B, L), enc.attention_forward(B, L),
                2.5 if enc.fused_attention else 2.0)
            add("projection", 2 * B * L * linear_params(model.projection), 0)
            if model.perceiver is not None:
                add("perceiver", *_perceiver_forward(model.perceiver, B, L))
            if readout is not None:
                # The scoring runs without gradient. ``adapter`` reads the title vectors (a buffer): its
                # backward is the weight gradient alone (1x); ``prev_adapter`` also reads the learned start
                # vector, so its input gradient is computed too (2x).
                out["readout"] = out.get("readout", 0) + _score_next_forward(model.encoder, B, L, readout.num_items)
                one = linear_flops(B * readout.tokens_per_request, readout.adapter.in_features,
                                   readout.adapter.out_features)
                out["readout"] += one * (2 if train else 1)
                if readout.title_tokens:
                    out["readout"] += one * (3 if train else 1)
        for blk in blocks:
            d = blk.q_proj.in_features
            kv_out = blk.k_proj.out_features + blk.v_proj.out_features
            lin = att = 0
            if (user_side and phase != "decode") or (phase == "decode" and not cache_kv):
                lin += linear_flops(B * n_user, d, kv_out)
            lin += linear_flops(B * T, d, blk.q_proj.out_features)
            lin += linear_flops(B * T, blk.o_proj.in_features, d)
            lin += 2 * B * T * linear_params(blk.ffn)
            att += attention_flops(B, blk.n_heads, T, n_user, blk.head_dim)
            add("cross_attention", lin, att)
    elif is_user and model.config.integration == "softprompt":
        prefix = model.config.task_prompt_len
    q_len = T + (prefix if phase != "decode" else 0)
    ctx = shape.past + T if phase == "decode" else q_len
    llm_lin = llm_shape.linear_forward(B, q_len)
    head = llm.get_output_embeddings() if hasattr(llm, "get_output_embeddings") else None
    head_rows = q_len
    if last_logits_only:
        head_rows = 1
    elif head_from is not None and phase != "decode" and keeps_logits(llm):
        head_rows = kept_positions(q_len, prefix + head_from)
    if head_rows < q_len and isinstance(head, nn.Linear):
        llm_lin -= linear_flops(B * (q_len - head_rows), head.in_features, head.out_features)
    add("llm", llm_lin, llm_shape.attention_forward(B, q_len, ctx), 2.5 if llm_shape.fused_attention else 2.0)
    if readout is not None and readout.copy_head is not None and L > 0:
        add("readout", _copy_head_forward(readout.copy_head, B, head_rows, n_user), 0)
    return FlopBreakdown(out)


def analytic_generation(model: nn.Module, batch: int, prompt_len: int, n_events: int, new_tokens: int,
                        cache_kv: bool = True) -> tuple[FlopBreakdown, list[FlopBreakdown]]:
    """(prefill, [each later decode step]) for greedy generation of ``new_tokens`` tokens with a KV cache.

    The prefill (user side + prompt) yields the first token; step i feeds token i and attends to all
    earlier positions (soft-prompt prefix included).
    """
    prefill = analytic_userllm(model, PassShape(batch, prompt_len, n_events), phase="forward",
                               last_logits_only=True)
    prefix = 0
    if hasattr(model, "encoder") and model.config.integration == "softprompt":
        prefix = model.num_prefix_tokens(n_events) if n_events > 0 else model.config.task_prompt_len
    steps = [analytic_userllm(model, PassShape(batch, 1, n_events, past=prefix + prompt_len + i - 1),
                              phase="decode", cache_kv=cache_kv) for i in range(1, new_tokens)]
    return prefill, steps
