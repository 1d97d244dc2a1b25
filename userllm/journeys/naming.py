"""Naming journeys with the LLM, three ways (``--method``), plus the LLM they run on.

* ``fewshot``: the plain LLM continues a text prompt holding the ``--shots`` nearest training journeys
  (by centroid cosine in the clustering space) with their names, then the journey to name; every journey
  is shown as its most recent titles. Meaningful with a real instruction LLM (``--llm DIR``); with the
  embedded tiny LLM it runs but has only its pretraining to go on.
* ``prompt`` (prompt-tuning): a :class:`~userllm.integration.UserLLM` whose LLM and encoder are frozen
  (strategy ``proj``); the journey's events enter through the integration (soft prompt: projected event
  embeddings followed by the learned task prompt; cross-attention: the gated blocks), and only the task
  prompt, the projection (and the cross-attention blocks) learn.
* ``finetune``: the same model with the LLM trained too (``--finetune lora`` adapters, or ``full``).

The trained namers read :data:`NAME_PROMPT` as text and produce ``" " + name`` then EOS (the labels
cover those tokens only), exactly like the train stage's tasks.
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

import numpy as np
import torch

from ..decoding import left_pad
from ..text_prompt import target_text

NAME_PROMPT = "Name this interest journey:"
FEWSHOT_HEADER = "Name each interest journey by its main themes."
FEWSHOT_JOURNEY, FEWSHOT_NAME = "Journey:", "Name:"


def journey_corpus(names: Sequence[str]) -> list[str]:
    """Texts added to the embedded LLM's pretraining corpus: the prompts and the training names (so that the
    frozen LLM of prompt-tuning can spell tags that the catalogue's titles and genres never contain)."""
    return [NAME_PROMPT, FEWSHOT_HEADER, FEWSHOT_JOURNEY, FEWSHOT_NAME] + [target_text(n) for n in names]


def build_llm(cfg, ds, extra_texts: Sequence[str], log: Callable[[str], None] = print):
    """``--llm DIR``, or the embedded default trained (cached) on the dataset's text plus ``extra_texts``.

    The train stage's :func:`userllm.train.build_llm` with a longer corpus.
    """
    from ..llm import DefaultLLMConfig, load_llm
    from ..text_prompt import corpus_texts
    from ..train import cache_root

    if cfg.llm is not None:
        return load_llm(cfg.llm)
    default = DefaultLLMConfig.sized(cfg.llm_hidden, cfg.llm_layers, cfg.tokenizer_vocab)
    return load_llm(None, texts=corpus_texts(ds) + list(extra_texts), cache_dir=cache_root(cfg, ds), seed=cfg.seed,
                    default_config=default, pretrain_steps=cfg.llm_pretrain_steps, log=log)


def clean_name(text: str) -> str:
    """A generated continuation cut at its first line break, whitespace collapsed."""
    return " ".join(text.split("\n", 1)[0].split())


def journey_features(ds, rows: Sequence[np.ndarray], window: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Encoder input of journeys: each one's last ``window`` events (time order), right padded with -1.

    rows: per journey, int64 sorted-event rows. Returns (one tensor per ``ds.feature_specs`` entry, int64
    [B, L] or [B, L, K]; lengths int64 [B]).
    """
    rows = [np.asarray(r, dtype=np.int64)[-window:] for r in rows]
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
    L = int(lengths.max())
    out = []
    for spec in ds.feature_specs:
        values = ds.features[spec.name]
        shape = (len(rows), L) + values.shape[1:]
        padded = np.full(shape, -1, dtype=np.int64)
        for b, r in enumerate(rows):
            padded[b, : len(r)] = values[r]
        out.append(torch.from_numpy(padded))
    return out, lengths


# ------------------------------------------------------------------------------------------- few-shot
def fewshot_prompt(titles: Sequence[str], examples: Sequence[tuple[Sequence[str], str]]) -> str:
    """The few-shot prompt: header, ``examples`` (titles, name), then the journey to name."""
    lines = [FEWSHOT_HEADER]
    for ex_titles, name in examples:
        lines += [f"{FEWSHOT_JOURNEY} {'; '.join(ex_titles)}", f"{FEWSHOT_NAME} {name}"]
    lines += [f"{FEWSHOT_JOURNEY} {'; '.join(titles)}", FEWSHOT_NAME]
    return "\n".join(lines)


@torch.no_grad()
def fewshot_names(llm, tok, ds, test_rows, train_rows, train_names, centroid: Callable[[np.ndarray], np.ndarray],
                  cfg, device: torch.device, batch_size: int = 16) -> list[str]:
    """Greedy few-shot names of the journeys ``test_rows`` with the ``cfg.shots`` nearest training journeys."""
    def titles(rows):
        return ds.item_titles(ds.features["item"][rows[-cfg.prompt_titles:]])

    train_c = np.stack([centroid(r) for r in train_rows]) if train_rows else np.zeros((0, 1))
    prompts = []
    for rows in test_rows:
        near = np.argsort(-(train_c @ centroid(rows)))[: cfg.shots] if cfg.shots and len(train_c) else []
        prompts.append(fewshot_prompt(titles(rows), [(titles(train_rows[i]), train_names[i]) for i in near]))
    llm.eval().to(device)
    names = []
    for s in range(0, len(prompts), batch_size):
        ids = [[tok.bos_token_id] + x for x in tok(prompts[s:s + batch_size], add_special_tokens=False)["input_ids"]]
        input_ids, mask = left_pad(ids, tok.pad_token_id, device)
        out = llm.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=cfg.max_name_tokens,
                           do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        names += [clean_name(t) for t in tok.batch_decode(out[:, input_ids.shape[1]:], skip_special_tokens=True)]
    return names


# ------------------------------------------------------------------------------ prompt- / fine-tuning
def build_namer(kind: str, cfg, llm, encoder):
    """A UserLLM for ``kind`` = "prompt" (LLM + encoder frozen) or "finetune" (LLM trained: lora / full)."""
    from ..integration import UserLLM, UserLLMConfig, apply_strategy

    # Gate opening as in userllm.train.build_model: closed (Flamingo) with a given --llm, 0.1 for the
    # embedded LLM whose closed gates barely open in a short run.
    gate = 0.0 if cfg.llm is not None else 0.1
    model = UserLLM(llm, encoder, UserLLMConfig(integration=cfg.integration, task_prompt_len=cfg.soft_prompt_tokens,
                                                gate_init=gate))
    strategy = "proj" if kind == "prompt" else cfg.finetune
    return apply_strategy(model, strategy, lora_r=cfg.lora_rank, lora_alpha=2 * cfg.lora_rank)


def _train_batch(ds, tok, rows, names, window: int):
    """(input_ids, attention_mask, labels int64 [B, T] right padded, features, lengths) of named journeys."""
    prompt = [tok.bos_token_id] + tok(NAME_PROMPT, add_special_tokens=False)["input_ids"]
    targets = [t + [tok.eos_token_id] for t in tok([target_text(n) for n in names],
                                                      add_special_tokens=False)["input_ids"]]
    T = len(prompt) + max(len(t) for t in targets)
    B = len(names)
    ids = torch.full((B, T), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    labels = torch.full((B, T), -100, dtype=torch.long)
    for b, t in enumerate(targets):
        n = len(prompt) + len(t)
        ids[b, :n] = torch.tensor(prompt + t)
        mask[b, :n] = 1
        labels[b, len(prompt):n] = torch.tensor(t)
    features, lengths = journey_features(ds, rows, window)
    return ids, mask, labels, features, lengths


def train_namer(model, tok, ds, rows: Sequence[np.ndarray], names: Sequence[str], cfg, device: torch.device,
                desc: str) -> dict:
    """AdamW (linear warmup, cosine decay) on the name tokens of training journeys; batches are a pure
    function of (seed, step). Returns {"steps", "first_loss", "final_loss", "seconds", "trainable"}."""
    from ..training import cosine_with_warmup, optimizer_step, progress

    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
    scheduler = cosine_with_warmup(optimizer, min(cfg.warmup, cfg.steps - 1), cfg.steps, 0.1)
    losses = []
    t0 = time.time()
    bar = progress(total=cfg.steps, desc=desc)
    for step in range(cfg.steps):
        idx = np.random.default_rng([cfg.seed, step]).choice(len(rows), size=min(cfg.batch_size, len(rows)),
                                                             replace=False)
        ids, mask, labels, features, lengths = _train_batch(ds, tok, [rows[i] for i in idx],
                                                            [names[i] for i in idx], cfg.window)
        loss = model(input_ids=ids.to(device), attention_mask=mask.to(device), labels=labels.to(device),
                     features=[f.to(device) for f in features], lengths=lengths.to(device)).loss
        optimizer_step(loss, optimizer, scheduler, params, cfg.grad_clip)
        losses.append(loss.item())
        bar.update(1)
    bar.close()
    k = max(1, len(losses) // 10)
    return {"steps": cfg.steps, "first_loss": float(np.mean(losses[:k])), "final_loss": float(np.mean(losses[-k:])),
            "seconds": round(time.time() - t0, 2), "trainable": int(sum(p.numel() for p in params))}


@torch.no_grad()
def generate_names(model, tok, ds, rows: Sequence[np.ndarray], cfg, device: torch.device,
                   batch_size: int = 32) -> list[str]:
    """Greedy names of the journeys ``rows`` from a trained namer."""
    model.to(device).eval()
    prompt = [tok.bos_token_id] + tok(NAME_PROMPT, add_special_tokens=False)["input_ids"]
    names = []
    for s in range(0, len(rows), batch_size):
        chunk = rows[s:s + batch_size]
        input_ids, mask = left_pad([prompt] * len(chunk), tok.pad_token_id, device)
        features, lengths = journey_features(ds, chunk, cfg.window)
        out = model.generate(input_ids, attention_mask=mask, features=[f.to(device) for f in features],
                             lengths=lengths.to(device), max_new_tokens=cfg.max_name_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        names += [clean_name(t) for t in tok.batch_decode(out[:, input_ids.shape[1]:], skip_special_tokens=True)]
    return names
