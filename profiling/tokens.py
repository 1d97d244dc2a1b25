"""LLM input tokens per example: User-LLM against the TextPrompt baseline.

What the LLM reads before it answers (the prompt; the generated target is not counted):

* **TextPrompt**: ``BOS + "History:\\n1. <title> | <rating> stars | <genres>\\n2. ...\\n<question>\\nAnswer:"``,
  the whole window rendered as text (:mod:`userllm.text_prompt`);
* **User-LLM, cross-attention**: ``BOS + "<question>\\nAnswer:"``. The events reach the LLM through the
  cross-attention blocks' keys/values, which add no positions to the LLM's context;
* **User-LLM, soft prompt**: the same text plus the prefix positions it prepends: one per user token
  (the Perceiver's latents, or one per event without a Perceiver) and the learned task prompt.

Counts use the run's tokenizer (the embedded default trained on the dataset, or any ``--llm`` one),
without the tokenizer's automatic special tokens plus one BOS, exactly how the training batches are built.

CLI: ``python -m userllm.profiling.tokens [--dataset synthetic] [--lengths 50 100 200] [--llm DIR]``.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np

from userllm.text_prompt import PromptRenderer, build_prompt, render_history

METHODS = ("userllm", "textprompt")


@dataclass
class TokenCount:
    """LLM context tokens of one example: ``text`` (BOS + prompt) + ``prefix`` (soft-prompt positions)."""

    method: str
    history_events: int
    text: int
    prefix: int = 0

    @property
    def total(self) -> int:
        return self.text + self.prefix

    def to_dict(self) -> dict[str, int | str]:
        return {**asdict(self), "total": self.total}


def count_text_tokens(tokenizer: Any, text: str, bos: bool = True) -> int:
    """Tokens of ``text`` with no automatic special tokens, plus one BOS when ``bos``."""
    return len(tokenizer(text, add_special_tokens=False)["input_ids"]) + int(bos)


def prefix_tokens(integration: str, n_events: int, perceiver_latents: int = 0, task_prompt_len: int = 0) -> int:
    """LLM positions the user side adds: 0 for cross-attention; user tokens + task prompt for soft prompt."""
    if integration == "xattn":
        return 0
    if integration != "softprompt":
        raise ValueError(f"integration must be xattn or softprompt, got {integration!r}")
    n_user = (perceiver_latents if perceiver_latents > 0 else n_events) if n_events > 0 else 0
    return n_user + task_prompt_len


def example_tokens(tokenizer: Any, task: str, events: Sequence[tuple[str, float | None, Sequence[str]]],
                   method: str, *, integration: str = "xattn", perceiver_latents: int = 0,
                   task_prompt_len: int = 0, category_word: str = "genre",
                   item_title: str | None = None) -> TokenCount:
    """Token count of one example whose history is ``events`` = [(title, rating, categories)], oldest first."""
    if method == "textprompt":
        prompt = build_prompt(task, render_history(events), category_word=category_word, item_title=item_title)
        return TokenCount(method, len(events), count_text_tokens(tokenizer, prompt))
    if method != "userllm":
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    prompt = build_prompt(task, None, category_word=category_word, item_title=item_title)
    return TokenCount(method, len(events), count_text_tokens(tokenizer, prompt),
                      prefix_tokens(integration, len(events), perceiver_latents, task_prompt_len))


def dataset_tokens(ds: Any, tokenizer: Any, task: str, starts: Sequence[int], rows: Sequence[int], method: str, *,
                   integration: str = "xattn", perceiver_latents: int = 0, task_prompt_len: int = 0
                   ) -> list[TokenCount]:
    """Token counts of the examples whose windows are sorted rows ``[starts[i], rows[i])`` of ``ds``."""
    renderer = PromptRenderer(ds, text_events=None if method == "textprompt" else 0)
    out = []
    for s, r in zip(starts, rows):
        prompt = renderer.prompt(task, int(s), int(r))
        n = int(r) - int(s)
        pre = 0 if method == "textprompt" else prefix_tokens(integration, n, perceiver_latents, task_prompt_len)
        out.append(TokenCount(method, n, count_text_tokens(tokenizer, prompt), pre))
    return out


def summarize(counts: Sequence[TokenCount]) -> dict[str, float]:
    """mean / min / max / p50 of total context tokens, and the mean text and prefix parts."""
    tot = np.array([c.total for c in counts], dtype=np.float64)
    if not len(tot):
        return {"n": 0}
    return {"n": int(len(tot)), "mean": float(tot.mean()), "min": int(tot.min()), "max": int(tot.max()),
            "p50": float(np.median(tot)), "text_mean": float(np.mean([c.text for c in counts])),
            "prefix_mean": float(np.mean([c.prefix for c in counts]))}


def full_window_examples(ds: Any, task: str, length: int, split: str = "test", limit: int | None = None):
    """Examples of ``task`` whose window holds exactly ``length`` events (the comparison is per length)."""
    from userllm.data.examples import make_examples

    ex = make_examples(ds, task, length, split)
    keep = np.flatnonzero(ex.lengths == length)
    if limit is not None:
        keep = keep[:limit]
    return ex.subset(keep)


def token_table(ds: Any, tokenizer: Any, task: str, lengths: Sequence[int], *, integration: str = "xattn",
                perceiver_latents: int = 0, task_prompt_len: int = 0, limit: int | None = 200,
                split: str = "test") -> list[dict[str, Any]]:
    """Per history length and method: the token summary over full-window examples of ``ds``."""
    rows = []
    for L in lengths:
        ex = full_window_examples(ds, task, L, split, limit)
        for method in METHODS:
            counts = dataset_tokens(ds, tokenizer, task, ex.start, ex.target, method, integration=integration,
                                    perceiver_latents=perceiver_latents, task_prompt_len=task_prompt_len)
            rows.append({"history_length": int(L), "method": method, **summarize(counts)})
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    from userllm.data.dataset import load_dataset
    from userllm.data.synthetic import SyntheticConfig
    from userllm.errors import UserError
    from userllm.llm import load_llm
    from userllm.text_prompt import corpus_texts

    ap = argparse.ArgumentParser(prog="python -m userllm.profiling.tokens", description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", default="synthetic")
    ap.add_argument("--path", default=None, help="the dataset's files (not for synthetic)")
    ap.add_argument("--task", default="nextitem")
    ap.add_argument("--lengths", type=int, nargs="+", default=[50, 100, 200])
    ap.add_argument("--llm", default=None, help="a local HF model directory whose tokenizer to use")
    ap.add_argument("--integration", default="xattn", choices=["xattn", "softprompt"])
    ap.add_argument("--perceiver-latents", type=int, default=0)
    ap.add_argument("--task-prompt-len", type=int, default=0)
    ap.add_argument("--limit", type=int, default=200, help="examples per length")
    args = ap.parse_args(argv)
    if min(args.lengths) < 1:
        raise UserError("--lengths must be positive")
    if args.dataset == "synthetic":
        n = max(args.lengths) + 3
        ds = load_dataset("synthetic", synthetic=SyntheticConfig(num_users=50, min_events=n, max_events=n))
    else:
        ds = load_dataset(args.dataset, args.path)
    if args.llm:
        _, tok = load_llm(args.llm)
    else:
        from userllm.data.dataset import default_cache_dir
        _, tok = load_llm(None, texts=corpus_texts(ds), cache_dir=default_cache_dir())
    rows = token_table(ds, tok, args.task, args.lengths, integration=args.integration,
                       perceiver_latents=args.perceiver_latents, task_prompt_len=args.task_prompt_len,
                       limit=args.limit)
    print(f"tokenizer: {tok.name_or_path}  dataset: {ds.name}  task: {args.task}")
    print(f"{'length':>6}  {'method':<10} {'n':>5} {'mean':>9} {'min':>7} {'max':>7}")
    for r in rows:
        if r["n"] == 0:
            print(f"{r['history_length']:>6}  {r['method']:<10} {0:>5}  (no user has a full window)")
            continue
        print(f"{r['history_length']:>6}  {r['method']:<10} {r['n']:>5} {r['mean']:>9.1f} {r['min']:>7} {r['max']:>7}")
    return 0


if __name__ == "__main__":
    from userllm.cli import run_cli

    raise SystemExit(run_cli(main))
