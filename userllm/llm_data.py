"""From event batches and strings to the token batches the LLM side trains and decodes on.

Training row (right padded; ``labels`` = -100 except on the target and its EOS)::

    <s> prompt-tokens  target-tokens </s> <pad> ...
                       ^^^^^^^^^^^^^^^^^^ labels

Generation row (left padded, so that every row's next token goes to the same cache column)::

    <pad> ... <s> prompt-tokens

Prompt and target are tokenized separately and concatenated, exactly as the constrained decoder's trie
(built from the same target strings) expects them. User-LLM batches carry the :class:`EventBatch` (the
encoder input); TextPrompt batches carry the same examples rendered as text and ``events=None``.

A :class:`Catalogue` holds the candidate strings of a classification-like task (distinct item titles for
NextItem, category names for FavGenre) and maps dataset label ids to catalogue entries.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np
import torch

from .data.examples import EventBatch
from .decoding import Trie, left_pad
from .text_prompt import PromptRenderer, target_text
from .utils.hf import IGNORE


@dataclass
class LLMBatch:
    """A training batch.

    input_ids, attention_mask, labels: int64 [B, T] (right padded; labels -100 outside the targets).
    events: the encoder input (None for the TextPrompt baseline).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    events: EventBatch | None

    def to(self, device) -> "LLMBatch":
        return replace(self, input_ids=self.input_ids.to(device), attention_mask=self.attention_mask.to(device),
                       labels=self.labels.to(device), events=None if self.events is None else self.events.to(device))

    def model_inputs(self) -> dict:
        """The keyword arguments of the model's forward (UserLLM or TextPrompt), without the labels."""
        return _model_inputs(self)

    @property
    def num_target_tokens(self) -> int:
        return int((self.labels != IGNORE).sum())


@dataclass
class PromptBatch:
    """A generation batch: left-padded prompts [B, P], the encoder input, and the references.

    entry_labels: int64 [B] catalogue entry of the answer (-1 for review generation).
    references: the target strings (review texts, titles, category names).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    events: EventBatch | None
    entry_labels: torch.Tensor
    references: list[str]

    def to(self, device) -> "PromptBatch":
        return replace(self, input_ids=self.input_ids.to(device), attention_mask=self.attention_mask.to(device),
                       events=None if self.events is None else self.events.to(device))

    def model_inputs(self) -> dict:
        """The keyword arguments of the model's forward / ``generate`` (UserLLM or TextPrompt)."""
        return _model_inputs(self)


def _model_inputs(batch) -> dict:
    kw = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
    if batch.events is not None:
        kw.update(features=batch.events.features, lengths=batch.events.lengths)
    return kw


@dataclass
class Catalogue:
    """Distinct answer strings of a task and the map from label ids to them.

    entries: list[str] of N distinct strings; label_to_entry: int64 [V] (-1 for ids with no entry, e.g. UNK).
    """

    entries: list[str]
    label_to_entry: np.ndarray

    @classmethod
    def for_task(cls, ds, task: str) -> "Catalogue | None":
        """Item titles (nextitem) or category names (favgenre); None for reviewg (free text)."""
        if task == "nextitem":
            names = ds.item_titles(np.arange(1, ds.num_items))
        elif task == "favgenre":
            names = ds.category_names(np.arange(1, len(ds.vocabs["category"])))
        else:
            return None
        index: dict[str, int] = {}
        label_to_entry = np.full(len(names) + 1, -1, dtype=np.int64)
        for label, name in enumerate(names, start=1):
            key = name.strip()
            if not key:
                continue
            # Duplicate titles (MovieLens lists a few films twice) share one entry: the text cannot tell
            # them apart, so predicting the title counts as predicting either item.
            label_to_entry[label] = index.setdefault(key, len(index))
        return cls(list(index), label_to_entry)

    def trie(self, tokenizer) -> Trie:
        return Trie.from_texts([target_text(e) for e in self.entries], tokenizer)

    def __len__(self) -> int:
        return len(self.entries)


class LLMBatcher:
    """Builds :class:`LLMBatch` / :class:`PromptBatch` from :class:`EventBatch` es.

    ds: the ProcessedDataset; tokenizer: HF tokenizer with bos/eos/pad; task: nextitem|favgenre|reviewg.
    text_events: window events also rendered as text (0 for User-LLM, None for the TextPrompt baseline,
        n for the mixed context). with_events: whether batches carry the encoder input.
    max_target_tokens: review targets are cut to this many tokens (titles and names never are).
    max_length: the LLM's context; longer prompts lose their oldest history tokens (after BOS).
    """

    def __init__(self, ds, tokenizer, task: str, *, text_events: int | None = 0, with_events: bool = True,
                 max_target_tokens: int = 32, max_length: int | None = None):
        self.ds, self.tok, self.task = ds, tokenizer, task
        self.renderer = PromptRenderer(ds, text_events)
        self.with_events = with_events
        self.max_target_tokens = max_target_tokens
        self.max_length = max_length
        self.catalogue = Catalogue.for_task(ds, task)
        self._target_cache: dict[str, list[int]] = {}

    # ------------------------------------------------------------------ strings
    def references(self, events: EventBatch) -> list[str]:
        labels = events.labels.cpu().numpy()
        if self.task == "nextitem":
            return self.ds.item_titles(labels)
        if self.task == "favgenre":
            return self.ds.category_names(labels)
        if events.texts is None:
            raise ValueError("reviewg batches need their target texts (EventBatch.texts)")
        return list(events.texts)

    def prompts(self, events: EventBatch) -> list[str]:
        rows = events.rows.cpu().numpy()
        starts = rows - events.lengths.cpu().numpy()
        return self.renderer.prompts(self.task, starts, rows)

    def _encode(self, texts: Sequence[str]) -> list[list[int]]:
        return self.tok(list(texts), add_special_tokens=False)["input_ids"]

    def _targets(self, refs: Sequence[str]) -> list[list[int]]:
        """Target token ids (without EOS). Titles/names are few and cached; reviews are cut, not cached."""
        if self.task == "reviewg":
            return [ids[: self.max_target_tokens] for ids in self._encode([target_text(r) for r in refs])]
        missing = [r for r in dict.fromkeys(refs) if r not in self._target_cache]
        if missing:
            self._target_cache.update(zip(missing, self._encode([target_text(r) for r in missing])))
        return [self._target_cache[r] for r in refs]

    def encode_prompts(self, prompts: Sequence[str], reserve: Sequence[int] | int) -> list[list[int]]:
        """BOS + prompt tokens per prompt; ``reserve[b]`` tokens are kept free for the target / generation
        (prompts longer than the LLM's context lose their oldest tokens). The one tokenization of prompts:
        training, evaluation and generation all go through it."""
        if isinstance(reserve, int):
            reserve = [reserve] * len(prompts)
        bos = self.tok.bos_token_id
        out = []
        for ids, r in zip(self._encode(prompts), reserve):
            if self.max_length is not None and 1 + len(ids) + r > self.max_length:
                ids = ids[len(ids) - max(0, self.max_length - 1 - r):]
            out.append([bos] + ids)
        return out

    def _prompt_ids(self, events: EventBatch, reserve: Sequence[int]) -> list[list[int]]:
        """BOS + prompt tokens per row; ``reserve[b]`` tokens are kept free for the target."""
        return self.encode_prompts(self.prompts(events), reserve)

    # ------------------------------------------------------------------ batches
    def train_batch(self, events: EventBatch) -> LLMBatch:
        refs = self.references(events)
        targets = [t + [self.tok.eos_token_id] for t in self._targets(refs)]
        prompts = self._prompt_ids(events, [len(t) for t in targets])
        T = max(len(p) + len(t) for p, t in zip(prompts, targets))
        B = len(prompts)
        ids = torch.full((B, T), self.tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((B, T), dtype=torch.long)
        labels = torch.full((B, T), IGNORE, dtype=torch.long)
        for b, (p, t) in enumerate(zip(prompts, targets)):
            n = len(p) + len(t)
            ids[b, :n] = torch.tensor(p + t)
            mask[b, :n] = 1
            labels[b, len(p):n] = torch.tensor(t)
        return LLMBatch(ids, mask, labels, events if self.with_events else None)

    def prompt_batch(self, events: EventBatch, reserve: int = 32) -> PromptBatch:
        refs = self.references(events)
        prompts = self._prompt_ids(events, [reserve] * len(refs))
        ids, mask = left_pad(prompts, self.tok.pad_token_id)
        if self.catalogue is not None:
            entry = torch.from_numpy(self.catalogue.label_to_entry[events.labels.cpu().numpy()])
        else:
            entry = torch.full((len(refs),), -1, dtype=torch.long)
        return PromptBatch(ids, mask, events if self.with_events else None, entry, refs)
