"""The language model side of User-LLM: any local Hugging Face causal LM, or an embedded tiny default.

``load_llm(path)`` loads a local HF causal-LM directory and its tokenizer, with no network access.
``load_llm(None, texts=..., cache_dir=...)`` builds the embedded default instead: a small
Llama-architecture model (grouped-query attention) from a :class:`~transformers.LlamaConfig`, plus a
byte-level BPE tokenizer trained with the ``tokenizers`` library on the dataset's text (item titles,
category names, reviews, prompt templates) and cached beside the processed data. Everything runs offline
and is reproducible from the seed.

The paper's LLM is pretrained; a randomly initialised one cannot be used frozen (strategies ``enc`` /
``proj``): its output head knows no title. With ``pretrain_steps > 0`` the default model is therefore
first pretrained as a causal LM on that same corpus (:func:`pretrain_default_llm`, nanoGPT style: the
texts packed into one token stream, random fixed-length windows), so that it "knows the catalogue's
vocabulary" before User-LLM training starts. The weights are cached beside the tokenizer
(:func:`cached_pretrained_llm`), keyed by the corpus, the model shape, the steps and the seed.

Every tokenizer returned here has ``pad_token_id``, ``bos_token_id`` and ``eos_token_id`` set (a model
without a pad token reuses EOS for padding; padding positions are always masked out of the loss).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from .errors import UserError
from .utils.atomic import atomic_directory
from .utils.cache import json_digest, read_manifest, write_manifest

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
MODEL_DTYPE = torch.float32  # weights of every LLM loaded here, whatever the checkpoint's dtype (see load_llm)
TOKENIZER_VERSION = 1  # bump when the training recipe below changes, to invalidate caches
LM_PRETRAIN_VERSION = 1  # bump when the LM pretraining recipe (LMPretrainConfig or the loop) changes

# Files any of the HF tokenizer formats leaves in a model directory.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model",
                   "vocab.txt")


@dataclass
class DefaultLLMConfig:
    """Shape of the embedded default LLM (Llama layout with GQA: 4 query heads share 2 KV heads).

    Small enough that a few hundred training steps fit in a couple of CPU minutes.
    """

    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 4096
    vocab_size: int = 2048  # BPE merges stop here (or earlier when the corpus is small)
    tie_word_embeddings: bool = True

    @classmethod
    def sized(cls, hidden: int, layers: int, vocab_size: int = 2048) -> "DefaultLLMConfig":
        """The default layout at another size: MLP 3x wide, heads of 32 dims below width 512 and of 64 from
        there (GPU-friendly), half as many KV heads as query heads. ``sized(1024, 8)`` has ~102M parameters
        (the issue's ">= ~100M" LLM of the inference benchmark); ``sized(128, 2)`` is the default."""
        head_dim = 32 if hidden < 512 else 64
        if hidden % head_dim:
            raise ValueError(f"LLM width {hidden} is not a multiple of its head size {head_dim}")
        heads = hidden // head_dim
        return cls(hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
                   num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), vocab_size=vocab_size)


def _tokenizer_key(texts: Sequence[str], vocab_size: int) -> str:
    h = hashlib.sha256()
    h.update(f"v{TOKENIZER_VERSION}:{vocab_size}:".encode())
    for t in texts:
        h.update(t.encode("utf-8", "surrogatepass"))
        h.update(b"\x00")
    return h.hexdigest()[:16]


def _wrap_fast(tokenizer_obj) -> "PreTrainedTokenizerFast":
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=tokenizer_obj, pad_token=PAD, bos_token=BOS, eos_token=EOS,
                                  unk_token=UNK, padding_side="right")
    return tok


def train_tokenizer(texts: Iterable[str], vocab_size: int = 2048) -> "PreTrainedTokenizerFast":
    """Train a byte-level BPE tokenizer on ``texts``.

    Byte-level: every string is encodable (no unknown characters), which matters for review text.
    No automatic special tokens: callers add BOS/EOS explicitly so that prompt and target token ids
    concatenate exactly as they are scored by the constrained decoder.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  special_tokens=[PAD, BOS, EOS, UNK],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(texts), trainer=trainer)
    return _wrap_fast(tok)


def _unusable(entry: Path, exc: Exception, log: Callable[[str], None] | None) -> None:
    if log:
        log(f"cache entry {entry} is unusable ({type(exc).__name__}: {exc}); rebuilding it")


def _seal(entry: Path, write: Callable[[Path], None], log: Callable[[str], None] | None) -> None:
    """Write a cache entry atomically and seal it with its manifest; an unwritable cache costs a rebuild
    next time, not this run."""
    try:
        with atomic_directory(entry) as tmp:
            write(tmp)
            write_manifest(tmp, kind=entry.name.split("-", 1)[0])
    except OSError as exc:
        if log:
            log(f"could not write the cache entry {entry} ({exc})")


def cached_tokenizer(texts: Sequence[str], cache_dir: str | os.PathLike | None, vocab_size: int = 2048,
                     log: Callable[[str], None] | None = print):
    """Train (or reuse) the default tokenizer; cached under ``cache_dir/tokenizer-<hash of corpus>``.

    The entry is verified against its manifest (:mod:`userllm.utils.cache`) before use; a damaged one is
    reported through ``log`` and retrained.
    """
    from transformers import PreTrainedTokenizerFast

    texts = list(texts)
    if cache_dir is None:
        return train_tokenizer(texts, vocab_size)
    entry = Path(cache_dir) / f"tokenizer-{_tokenizer_key(texts, vocab_size)}"
    if entry.exists():
        try:
            read_manifest(entry, required=("tokenizer.json",))
            return PreTrainedTokenizerFast(tokenizer_file=str(entry / "tokenizer.json"), pad_token=PAD,
                                           bos_token=BOS, eos_token=EOS, unk_token=UNK, padding_side="right")
        except Exception as exc:  # noqa: BLE001 - a damaged entry is rebuilt, never trusted
            _unusable(entry, exc, log)
    tok = train_tokenizer(texts, vocab_size)
    _seal(entry, lambda tmp: tok.backend_tokenizer.save(str(tmp / "tokenizer.json")), log)
    return tok


def build_default_llm(vocab_size: int, config: DefaultLLMConfig | None = None, seed: int = 0):
    """A randomly initialised Llama-architecture causal LM (seeded, so runs are reproducible)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = config or DefaultLLMConfig()
    fields = asdict(cfg)
    fields["vocab_size"] = vocab_size
    lcfg = LlamaConfig(**fields, pad_token_id=0, bos_token_id=1, eos_token_id=2, rms_norm_eps=1e-5,
                       attention_dropout=0.0, hidden_act="silu")
    # Seed a private generator state so model init does not depend on (or disturb) the caller's RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(lcfg)
    return model


@dataclass
class LMPretrainConfig:
    """Recipe of the default LLM's causal-LM pretraining (nanoGPT-style packed windows, AdamW, cosine).

    ``batch_size`` windows of ``block`` tokens per step (4096 tokens). The corpora are ~0.4-0.5M tokens
    (synthetic: mostly its templated reviews; ml-latest-small: the titles and genres of 9.7k movies), so
    300 steps are 2-3 passes: enough to learn how the catalogue's titles, category names and the prompt
    templates are spelt, which is what a frozen LLM must already be able to write. Measured on 2 busy
    CPU cores (1 thread): ~0.3 s a step with the default 2-layer width-128 model.
    """

    steps: int = 300
    batch_size: int = 32
    block: int = 128
    lr: float = 3e-3
    warmup: int = 20
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0


def corpus_token_stream(texts: Sequence[str], tok, seed: int = 0) -> torch.Tensor:
    """int64 [N]: every text as ``<s> text </s>``, in an order shuffled with ``seed``, concatenated.

    Each text is tokenized exactly as the LLM sees it later (no automatic special tokens), and targets in the
    corpus carry their leading space (``text_prompt.corpus_texts``), as in the training rows.
    """
    order = np.random.default_rng([seed, 17]).permutation(len(texts))
    ids = tok([texts[i] for i in order], add_special_tokens=False)["input_ids"]
    bos, eos = tok.bos_token_id, tok.eos_token_id
    stream = [t for seq in ids for t in (bos, *seq, eos)]
    return torch.tensor(stream, dtype=torch.long)


def lm_batch(stream: torch.Tensor, step: int, batch_size: int, block: int, seed: int) -> torch.Tensor:
    """int64 [B, block+1]: random windows of the token stream, a pure function of (seed, step).

    A stream shorter than a window is repeated (the tiny test corpora).
    """
    need = block + 1
    if len(stream) < need + 1:
        stream = stream.repeat(need // max(1, len(stream)) + 2)
    starts = np.random.default_rng([seed, step]).integers(0, len(stream) - need + 1, size=batch_size)
    return torch.stack([stream[s:s + need] for s in starts])


def pretrain_default_llm(model, tok, texts: Sequence[str], config: LMPretrainConfig | None = None,
                         log: Callable[[str], None] | None = print) -> dict:
    """Causal-LM pretraining of ``model`` (in place, on its current device) on the corpus ``texts``.

    Returns ``{"steps", "first_loss", "final_loss", "tokens", "seconds"}`` (losses: mean of the first / last
    10% of steps). Runs with its own forked RNG, so the caller's random state is the same whether this runs
    or its result comes from the cache.
    """
    import time

    from .loop import cosine_with_warmup, optimizer_step, progress

    cfg = config or LMPretrainConfig()
    stream = corpus_token_stream(list(texts), tok, cfg.seed)
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    scheduler = cosine_with_warmup(optimizer, min(cfg.warmup, max(0, cfg.steps - 1)), cfg.steps, cfg.min_lr_ratio)
    was_training = model.training
    model.train()
    losses: list[float] = []
    t0 = time.time()
    bar = progress(total=cfg.steps, desc="pretrain default LLM")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        for step in range(cfg.steps):
            batch = lm_batch(stream, step, cfg.batch_size, cfg.block, cfg.seed).to(device)
            # HF shifts the labels inside the model: position t predicts token t+1.
            loss = model(input_ids=batch, labels=batch).loss
            optimizer_step(loss, optimizer, scheduler, params, cfg.grad_clip)
            losses.append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()
    model.train(was_training)
    k = max(1, len(losses) // 10)
    info = {"steps": cfg.steps, "first_loss": float(np.mean(losses[:k])), "final_loss": float(np.mean(losses[-k:])),
            "tokens": int(len(stream)), "seconds": round(time.time() - t0, 2)}
    if log:
        log(f"pretrained the default LLM on the dataset's text ({info['tokens']} tokens) for {cfg.steps} steps: "
            f"loss {info['first_loss']:.3f} -> {info['final_loss']:.3f} ({info['seconds']:.0f}s)")
    return info


def _pretrained_key(texts: Sequence[str], tok, model_config: DefaultLLMConfig | None, cfg: LMPretrainConfig,
                    vocab_size: int) -> str:
    doc = {"version": LM_PRETRAIN_VERSION, "corpus": _tokenizer_key(texts, vocab_size),
           "tokenizer": tokenizer_fingerprint(tok), "model": asdict(model_config) if model_config else None,
           "recipe": asdict(cfg)}
    return json_digest(doc, 16)


def cached_pretrained_llm(model, tok, texts: Sequence[str], cache_dir: str | os.PathLike | None,
                          config: LMPretrainConfig, *, model_config: DefaultLLMConfig | None = None,
                          log: Callable[[str], None] | None = print) -> dict:
    """Load the pretrained default weights into ``model`` from the cache, or pretrain and cache them.

    Cache entry: ``cache_dir/llm-<key>/{model.safetensors, pretrain.json}``, written atomically (a reader
    finds the whole entry or none). The key hashes the corpus (which identifies the dataset's text and the
    tokenizer), the tokenizer's vocabulary, the model shape (``model_config``), and the recipe (steps, seed,
    ...). ``cache_dir=None`` pretrains without caching. Returns the pretraining info (``cached`` = hit).
    """
    from safetensors.torch import load_model, save_model

    vocab = (model_config or DefaultLLMConfig()).vocab_size
    if cache_dir is None:
        return pretrain_default_llm(model, tok, texts, config, log) | {"cached": False}
    entry = Path(cache_dir) / f"llm-{_pretrained_key(texts, tok, model_config, config, vocab)}"
    if entry.exists():
        # A load that fails halfway must not leave the seeded initial weights half overwritten: the rebuild
        # pretrains from exactly the weights an empty cache would have.
        initial = {k: v.clone() for k, v in model.state_dict().items()}
        try:
            read_manifest(entry, required=("model.safetensors", "pretrain.json"))
            info = json.loads((entry / "pretrain.json").read_text())
            # load_model handles the tied input/output embeddings (stored once); strict: every weight is there.
            load_model(model, str(entry / "model.safetensors"), strict=True)
            if log:
                log(f"default LLM: pretrained weights from {entry} ({info['steps']} steps, final loss "
                    f"{info['final_loss']:.3f})")
            return info | {"cached": True}
        except Exception as exc:  # noqa: BLE001 - a damaged entry is rebuilt, never trusted
            model.load_state_dict(initial)
            _unusable(entry, exc, log)
        del initial
    info = pretrain_default_llm(model, tok, texts, config, log)

    def write(tmp: Path) -> None:
        save_model(model, str(tmp / "model.safetensors"))
        (tmp / "pretrain.json").write_text(json.dumps(info | {"recipe": asdict(config)}, indent=2) + "\n")

    _seal(entry, write, log)
    return info | {"cached": False}


def _check_special_tokens(tok) -> None:
    if tok.eos_token_id is None:
        raise UserError(f"the tokenizer of {tok.name_or_path!r} has no EOS token; the constrained decoder needs one")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # GPT-2 style tokenizers: pad positions are masked anyway
    if tok.bos_token_id is None:
        tok.bos_token = tok.eos_token
    tok.padding_side = "right"


def check_llm_dir(path: str | os.PathLike) -> Path:
    """Cheap checks of an ``--llm`` directory (before any heavy work): exists, has config.json and a tokenizer."""
    p = Path(path)
    if not p.is_dir():
        raise UserError(f"--llm {p}: no such directory")
    if not (p / "config.json").is_file():
        raise UserError(f"--llm {p}: not a Hugging Face model directory (no config.json)")
    if not any((p / f).is_file() for f in TOKENIZER_FILES):
        raise UserError(f"--llm {p}: the directory has no tokenizer (expected one of {', '.join(TOKENIZER_FILES)})")
    return p


def load_llm(path: str | os.PathLike | None = None, *, texts: Iterable[str] | None = None,
             cache_dir: str | os.PathLike | None = None, seed: int = 0,
             default_config: DefaultLLMConfig | None = None, torch_dtype: torch.dtype | None = None,
             pretrain_steps: int = 0, log: Callable[[str], None] | None = print):
    """Return ``(model, tokenizer)``.

    path: a local HF causal-LM directory (config.json + weights + tokenizer files); loaded with
          ``local_files_only=True``. ``None`` builds the embedded default from ``texts`` (required then).
    cache_dir: where the default tokenizer (and pretrained default weights) are cached (beside the data).
    pretrain_steps: default LLM only: causal-LM pretraining steps on ``texts`` (0 = random init);
          see :func:`cached_pretrained_llm`. Ignored with ``path``.
    torch_dtype: weight dtype of a ``path`` model (default float32 whatever dtype it was saved in: training
          keeps float32 weights and optimizer states; bf16 is GPU autocast, ``--bf16``).
    log: where the default LLM's pretraining reports (None = silent).
    Raises :class:`UserError` naming the path when it is missing, not a causal LM, or has no tokenizer.
    """
    if path is None:
        if texts is None:
            raise ValueError("load_llm(None) builds the default LLM and needs the corpus `texts` for its tokenizer")
        cfg = default_config or DefaultLLMConfig()
        texts = list(texts)
        tok = cached_tokenizer(texts, cache_dir, cfg.vocab_size, log=log)
        model = build_default_llm(len(tok), cfg, seed)
        model.config.pad_token_id, model.config.bos_token_id = tok.pad_token_id, tok.bos_token_id
        model.config.eos_token_id = tok.eos_token_id
        tok.name_or_path = "<default>"
        if pretrain_steps > 0:
            cached_pretrained_llm(model, tok, texts, cache_dir, LMPretrainConfig(steps=pretrain_steps, seed=seed),
                                  model_config=cfg, log=log)
        return model, tok

    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = check_llm_dir(path)
    try:
        tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure here is a problem with the user's directory
        raise UserError(f"--llm {p}: cannot load its tokenizer ({type(exc).__name__}: {exc})") from None
    try:
        # Hub checkpoints are mostly saved in bf16, and transformers 5 loads a checkpoint in its saved dtype;
        # training keeps float32 weights (and Adam states) everywhere, bf16 comes from autocast on GPU only.
        model = AutoModelForCausalLM.from_pretrained(str(p), local_files_only=True, dtype=torch_dtype or MODEL_DTYPE)
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"--llm {p}: cannot load a causal LM ({type(exc).__name__}: {exc})") from None
    _check_special_tokens(tok)
    if len(tok) > model.get_input_embeddings().weight.shape[0]:
        raise UserError(f"--llm {p}: tokenizer has {len(tok)} tokens but the model only "
                        f"{model.get_input_embeddings().weight.shape[0]} embeddings")
    return model, tok


def save_llm_spec(dest_dir: str | os.PathLike, model, tokenizer) -> None:
    """Save what is needed to rebuild the LLM skeleton (config + tokenizer) into ``dest_dir`` atomically.

    Weights live in the training checkpoint; this lets ``userllm.evaluate`` rebuild the exact architecture
    and tokenizer of a run even when the tokenizer cache or the ``--llm`` directory has since moved.
    """
    with atomic_directory(dest_dir) as tmp:
        model.config.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))


def load_llm_spec(src_dir: str | os.PathLike):
    """Rebuild ``(model, tokenizer)`` with random weights from a :func:`save_llm_spec` directory."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src = Path(src_dir)
    if not (src / "config.json").is_file():
        raise UserError(f"{src}: missing LLM config (was the run written by userllm.train?)")
    tok = AutoTokenizer.from_pretrained(str(src), local_files_only=True)
    cfg = AutoConfig.from_pretrained(str(src), local_files_only=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg, dtype=MODEL_DTYPE)   # as load_llm: float32 weights
    _check_special_tokens(tok)
    return model, tok


def describe_llm(model) -> str:
    """One line: architecture, layers, width, parameter count."""
    cfg = model.config
    n = sum(p.numel() for p in model.parameters())
    layers = getattr(cfg, "num_hidden_layers", getattr(cfg, "n_layer", "?"))
    width = getattr(cfg, "hidden_size", getattr(cfg, "n_embd", "?"))
    return f"{type(model).__name__} ({layers} layers, width {width}, {n / 1e6:.2f}M parameters)"


def tokenizer_fingerprint(tok) -> str:
    """Hash of the tokenizer's vocabulary (to check a checkpoint matches the tokenizer it is loaded with)."""
    vocab = tok.get_vocab()
    return json_digest(sorted(vocab.items()), 16)
