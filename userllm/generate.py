"""Generate with a trained run for chosen users (``python -m userllm.generate RUN_DIR``).

    python -m userllm.generate runs/x --users 3 17                     # dataset user indices, greedy
    python -m userllm.generate runs/x --user-ids u4 u18 --constrained --num-return 5
    python -m userllm.generate runs/x --histories h.json --do-sample --temperature 0.8 --seed 1
    python -m userllm.generate runs/x --users 3 --split test --num-beams 4 --out gen.jsonl

The run (``config.json``, ``llm/``, ``encoder.json``, latest checkpoint) is rebuilt with
:func:`userllm.factory.load_run` on the run's dataset. Each requested user gets a history of at most
``window`` events (the run's ``--window``):

* ``--users`` (dense dataset user indices) / ``--user-ids`` (the source's raw user ids): with
  ``--split all`` (default) the user's most recent events, predicting beyond the data; with
  ``--split test|val`` the evaluation example's window, and the output also holds the reference answer;
* ``--histories FILE.json``: ``[history, ...]`` or ``{"name": history, ...}``; a history is a list of
  raw item ids (as in the source data), or of ``{"item": id, "rating": r}`` objects. Longer histories
  keep their most recent ``window`` events.

The prompt is the task's (the run's ``--task``), or ``--prompt QUESTION`` in its place; TextPrompt runs
(and mixed-context runs) get the history rendered as text in the prompt. Prompts are rendered and
tokenized by the run's :class:`~userllm.llm_data.LLMBatcher` (:func:`build_prompts`), the one prompt path
of training, evaluation and generation.
ReviewG needs the reviewed item: the split's target, or ``--item RAW_ID``.

Decoding: User-LLM runs through :meth:`UserLLM.generate` (the user K/V are projected once per request),
TextPrompt runs through the LLM's Hugging Face ``generate``: greedy by default, ``--num-beams N`` beam
search, ``--do-sample`` (``--temperature``, ``--top-k``, ``--top-p``) sampling, ``--num-return N``
sequences per user, ``--max-new-tokens``. ``--constrained`` instead runs the evaluation's trie-constrained
beam search (:func:`userllm.decoding.constrained_beam_search`), so every answer is a catalogue entry
(an item title, or a category name for FavGenre), with its log-likelihood; with ``--prior-weight W`` (a
cross-attention User-LLM) its score is log p(entry | user) - W log p(entry | no history) instead
(:class:`~userllm.decoding.ContrastiveStepper`).

Output: one JSON object per user, printed or written to ``--out FILE`` (JSON lines): ``user``,
``user_id`` / ``name``, ``history`` (raw item ids), ``prompt``, ``generations`` (strings, best first),
``scores`` (sequence log-likelihoods; constrained and beam search) and ``reference`` (``--split test|val``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .cli import ArgumentParser, run_cli, select_kernels
from .errors import UserError
from .utils.atomic import write_text

SPLITS = ("all", "test", "val")


@dataclass
class Request:
    """One user to generate for: the history as sorted-event-like ids, and what to report about it."""

    items: list[int]                       # item vocab ids, oldest first (<= window)
    ratings: list[int]                     # rating vocab ids (UNK 0 when unknown)
    events: list[tuple]                    # (title, rating, categories) of each event, as the prompt renders it
    info: dict[str, Any] = field(default_factory=dict)   # user / user_id / name / reference ...
    target_item: int | None = None         # item vocab id of the reviewed item (reviewg)


# ------------------------------------------------------------------------------------------ histories
def _last(rows: range, window: int) -> range:
    return range(max(rows.start, rows.stop - window), rows.stop)


def dataset_requests(batcher, window: int, users: Sequence[int], split: str) -> list[Request]:
    """Requests for dense user indices of the run's dataset: the most recent window (``all``) or the
    split's example (with its reference)."""
    from .data.examples import make_examples

    ds, task = batcher.ds, batcher.task
    examples = make_examples(ds, task, window, split) if split != "all" else None
    catalogue = batcher.catalogue if split != "all" else None
    out = []
    raw_ids = np.asarray(ds.events.user_ids)
    for u in users:
        info: dict[str, Any] = {"user": int(u), "user_id": str(raw_ids[u])}
        target = None
        if examples is None:
            rows = _last(range(int(ds.offsets[u]), int(ds.offsets[u + 1])), window)
        else:
            (hit,) = np.nonzero(examples.user == u)
            if len(hit) == 0:
                raise UserError(f"user {u} ({raw_ids[u]}) has no {task} {split} example")
            i = int(hit[0])
            rows = range(int(examples.start[i]), int(examples.target[i]))
            target = int(examples.target[i])
            if examples.texts is not None:
                info["reference"] = examples.texts[i]
            elif catalogue is not None:
                entry = int(catalogue.label_to_entry[examples.labels[i]])
                info["reference"] = catalogue.entries[entry] if entry >= 0 else None
        rows_arr = np.asarray(rows, dtype=np.int64)
        items = ds.features["item"][rows_arr].tolist()
        out.append(Request(items, ds.features["rating"][rows_arr].tolist(),
                           [batcher.renderer.event(r) for r in rows], info,
                           None if target is None else int(ds.features["item"][target])))
    return out


def resolve_users(ds, indices: Sequence[int], raw_ids: Sequence[str]) -> list[int]:
    """Dense user indices from ``--users`` (indices) and ``--user-ids`` (raw ids); UserError naming a bad one."""
    out = []
    for u in indices:
        if not 0 <= u < ds.num_users:
            raise UserError(f"--users {u}: no such user (the {ds.name} dataset has users 0..{ds.num_users - 1})")
        out.append(int(u))
    if raw_ids:
        index = {str(r): i for i, r in enumerate(np.asarray(ds.events.user_ids).tolist())}
        for r in raw_ids:
            if str(r) not in index:
                raise UserError(f"--user-ids {r}: no user with this id in the {ds.name} dataset")
            out.append(index[str(r)])
    return out


def read_histories(path: str | Path, batcher, window: int) -> list[Request]:
    """Requests from a JSON file of histories (module docstring); UserError naming the file and the entry."""
    ds = batcher.ds
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--histories {p}: no such file")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"--histories {p}: not valid JSON ({exc})") from None
    if isinstance(data, dict):
        named = [(str(k), v) for k, v in data.items()]
    elif isinstance(data, list):
        named = [(str(i), v) for i, v in enumerate(data)]
    else:
        raise UserError(f"--histories {p}: expected a list of histories or an object of named histories")
    if not named:
        raise UserError(f"--histories {p}: no histories")
    item_vocab, rating_vocab = ds.vocabs["item"], ds.vocabs["rating"]
    out = []
    for name, hist in named:
        where = f"--histories {p}: history {name!r}"
        if not isinstance(hist, list) or not hist:
            raise UserError(f"{where}: expected a non-empty list of item ids")
        items, ratings = [], []
        for pos, ev in enumerate(hist):
            raw, rating = (ev.get("item"), ev.get("rating")) if isinstance(ev, dict) else (ev, None)
            if raw is None or isinstance(raw, (bool, list, dict)):
                raise UserError(f"{where}, event {pos}: expected an item id or {{\"item\": id, \"rating\": r}}")
            vid = item_vocab.id(raw)
            if vid == 0:
                raise UserError(f"{where}, event {pos}: unknown item id {raw!r} (not in the {ds.name} catalogue)")
            items.append(int(vid))
            ratings.append(int(rating_vocab.id(rating)) if rating is not None else 0)
        items, ratings = items[-window:], ratings[-window:]
        out.append(Request(items, ratings, [batcher.renderer.event_from_ids(i, r) for i, r in zip(items, ratings)],
                           {"name": name}))
    return out


def event_features(ds, requests: Sequence[Request]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The encoder input of the requests: one right-padded tensor per feature spec (-1 = padding)."""
    L = max(len(r.items) for r in requests)
    lengths = torch.tensor([len(r.items) for r in requests], dtype=torch.int64)
    items = np.full((len(requests), L), -1, dtype=np.int64)
    ratings = np.full((len(requests), L), -1, dtype=np.int64)
    for b, r in enumerate(requests):
        items[b, :len(r.items)] = r.items
        ratings[b, :len(r.ratings)] = r.ratings
    feats = []
    for spec in ds.feature_specs:
        if spec.name == "item":
            feats.append(torch.from_numpy(items))
        elif spec.name == "rating":
            feats.append(torch.from_numpy(ratings))
        elif spec.name == "category":
            cats = ds.item_categories[np.clip(items, 0, None)]
            feats.append(torch.from_numpy(np.where(items[..., None] >= 0, cats, -1)))
        else:
            raise UserError(f"the run's dataset has a feature {spec.name!r} that generate cannot build")
    return feats, lengths


# --------------------------------------------------------------------------------------------- prompts
def build_prompts(batcher, requests: Sequence[Request], question: str | None = None,
                  reserve: int = 32) -> tuple[list[str], list[list[int]]]:
    """(prompt texts, BOS + prompt token ids) of the requests, by the run's batcher as in training:
    the task's question (or ``question``), the history as text for TextPrompt / mixed-context runs,
    ``reserve`` tokens kept free for the generation within the LLM's context."""
    ds = batcher.ds
    texts = []
    for r in requests:
        title = ds.item_titles([r.target_item])[0] if r.target_item is not None else None
        if question is None and batcher.task == "reviewg" and title is None:
            raise UserError("the reviewg task needs the reviewed item: use --split test|val or --item RAW_ID")
        texts.append(batcher.renderer.events_prompt(batcher.task, r.events, title, question))
    return texts, batcher.encode_prompts(texts, reserve)


# ------------------------------------------------------------------------------------------ generation
@dataclass
class DecodeOptions:
    max_new_tokens: int = 32
    num_beams: int = 1
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    num_return: int = 1
    constrained: bool = False
    prior_weight: float = 0.0   # constrained: W in log p(entry | user) - W log p(entry | no history)


@torch.no_grad()
def generate_batch(run, requests: Sequence[Request], prompt_ids: Sequence[Sequence[int]],
                   opts: DecodeOptions) -> list[dict]:
    """Generations for one batch of requests: [{"generations": [...], "scores": [...] | None}, ...]."""
    from .decoding import ContrastiveStepper, HFStepper, UserLLMStepper, constrained_beam_search, left_pad

    tok, model, dev = run.tok, run.model, run.device
    ids, mask = left_pad(list(prompt_ids), tok.pad_token_id)
    ids, mask = ids.to(dev), mask.to(dev)
    feats = lengths = None
    if run.user_llm:
        feats, lengths = event_features(run.ds, requests)
        feats, lengths = [f.to(dev) for f in feats], lengths.to(dev)
    with run.amp():
        if opts.constrained:
            catalogue = run.batcher.catalogue
            trie = catalogue.trie(tok)
            if run.user_llm:
                stepper = ContrastiveStepper(model, opts.prior_weight) if opts.prior_weight else UserLLMStepper(model)
                logits, past = stepper.prefill(ids, mask, feats, lengths)
            else:
                stepper = HFStepper(model.llm)
                logits, past = stepper.prefill(ids, mask)
            out = constrained_beam_search(stepper, logits, past, trie, num_beams=max(opts.num_beams, opts.num_return),
                                          top_k=opts.num_return, log_scores=bool(opts.prior_weight))
            return [{"generations": [catalogue.entries[e] for e in ents], "scores": [round(s, 4) for s in sc]}
                    for ents, sc in zip(out.entries, out.scores)]
        kwargs: dict[str, Any] = dict(max_new_tokens=opts.max_new_tokens, num_beams=opts.num_beams,
                                      do_sample=opts.do_sample, num_return_sequences=opts.num_return,
                                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                      return_dict_in_generate=True, output_scores=opts.num_beams > 1)
        if opts.do_sample:
            kwargs.update(temperature=opts.temperature, top_k=opts.top_k, top_p=opts.top_p)
        if run.user_llm:
            out = model.generate(ids, mask, features=feats, lengths=lengths, **kwargs)
        else:
            out = model.generate(ids, mask, **kwargs)
    new = out.sequences[:, ids.shape[1]:]
    texts = [tok.decode(x, skip_special_tokens=True).strip() for x in new.tolist()]
    scores = getattr(out, "sequences_scores", None)
    n = opts.num_return
    return [{"generations": texts[b * n:(b + 1) * n],
             "scores": None if scores is None else [round(float(s), 4) for s in scores[b * n:(b + 1) * n]]}
            for b in range(len(requests))]


def generate(run, requests: Sequence[Request], opts: DecodeOptions, question: str | None = None,
             batch_size: int = 8) -> list[dict]:
    """One output record per request (module docstring), in request order."""
    ds = run.ds
    records = []
    for a in range(0, len(requests), batch_size):
        chunk = list(requests[a:a + batch_size])
        prompts, ids = build_prompts(run.batcher, chunk, question, reserve=max(opts.max_new_tokens, 32))
        for r, p, g in zip(chunk, prompts, generate_batch(run, chunk, ids, opts)):
            rec = {**r.info, "history": [str(x) for x in ds.events.items.raw_ids[ds.item_index[r.items]]],
                   "prompt": p, **g}
            if rec["scores"] is None:
                del rec["scores"]
            records.append(rec)
    return records


# ---------------------------------------------------------------------------------------------- CLI
def build_parser() -> ArgumentParser:
    ap = ArgumentParser(prog="python -m userllm.generate", description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", help="a run directory written by python -m userllm.train")
    who = ap.add_argument_group("users (at least one of)")
    who.add_argument("--users", type=int, nargs="+", default=[], metavar="INDEX", help="dataset user indices")
    who.add_argument("--user-ids", nargs="+", default=[], metavar="ID", help="the source's raw user ids")
    who.add_argument("--histories", metavar="FILE.json", help="JSON histories of raw item ids")
    ap.add_argument("--split", choices=SPLITS, default="all",
                    help="dataset users: all = the most recent events; test/val = the evaluation example "
                         "(with its reference)")
    ap.add_argument("--prompt", default=None, help="question replacing the task's (default: the run's task prompt)")
    ap.add_argument("--item", default=None, help="reviewg: raw id of the item to review (--split all / histories)")
    ap.add_argument("--max-new-tokens", type=int, default=32, help="generated tokens at most (not constrained)")
    ap.add_argument("--num-beams", type=int, default=1, help="beam search when > 1")
    ap.add_argument("--do-sample", action="store_true", help="sample instead of greedy / beam search")
    ap.add_argument("--temperature", type=float, default=1.0,
                    help="with --do-sample: softmax temperature (> 0; lower = more greedy)")
    ap.add_argument("--top-k", type=int, default=50, help="with --do-sample: sample among the k likeliest tokens")
    ap.add_argument("--top-p", type=float, default=1.0,
                    help="with --do-sample: nucleus sampling, the smallest set of tokens of probability >= p "
                         "(1 = off)")
    ap.add_argument("--num-return", type=int, default=1, help="sequences returned per user")
    ap.add_argument("--constrained", action="store_true",
                    help="trie-constrained beam search over the catalogue (nextitem / favgenre)")
    ap.add_argument("--prior-weight", type=float, default=0.0,
                    help="with --constrained, a cross-attention User-LLM: rank by log p(entry | user) - W log "
                         "p(entry | no history) (0 = the likelihood)")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed")
    ap.add_argument("--batch-size", type=int, default=8, help="users decoded together")
    ap.add_argument("--checkpoint", default=None, help="checkpoint file (default: the run's latest)")
    ap.add_argument("--device", default=None, help="override the run's --device")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: the run's rule)")
    ap.add_argument("--out", default=None, help="write JSON lines here instead of printing them")
    return ap


def check_options(args, opts: DecodeOptions) -> None:
    for name in ("max_new_tokens", "num_beams", "num_return", "batch_size", "top_k"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 0.0 <= args.prior_weight <= 1.0:
        raise UserError(f"--prior-weight must be in [0, 1], got {args.prior_weight}")
    if args.prior_weight and not args.constrained:
        raise UserError("--prior-weight: only with --constrained (it weighs the catalogue beam search's scores)")
    if not (args.temperature > 0 and 0 < args.top_p <= 1):
        raise UserError("--temperature must be > 0 and --top-p in (0, 1]")
    if not (args.users or args.user_ids or args.histories):
        raise UserError("choose users: --users INDEX..., --user-ids ID... and/or --histories FILE.json")
    if opts.constrained and opts.do_sample:
        raise UserError("--constrained is a beam search; it cannot be combined with --do-sample")
    if not opts.constrained and not opts.do_sample and opts.num_return > opts.num_beams:
        raise UserError(f"--num-return {opts.num_return} needs --num-beams >= {opts.num_return} (or --do-sample)")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    opts = DecodeOptions(max_new_tokens=args.max_new_tokens, num_beams=args.num_beams, do_sample=args.do_sample,
                         temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                         num_return=args.num_return, constrained=args.constrained, prior_weight=args.prior_weight)
    check_options(args, opts)
    if not Path(args.run_dir).is_dir():
        raise UserError(f"{args.run_dir}: no such run directory")
    from .factory import load_run

    # --prior-weight goes through the run's config, whose check says which runs can empty a user context
    run = load_run(args.run_dir, checkpoint=args.checkpoint, device=args.device, threads=args.threads,
                   overrides={"prior_weight": args.prior_weight})
    select_kernels(run.cfg, run.device)
    if opts.constrained and run.batcher.catalogue is None:
        raise UserError(f"--constrained needs a catalogue task (nextitem / favgenre); this run's task is "
                        f"{run.cfg.task}")
    ds, window = run.ds, run.cfg.window
    requests = dataset_requests(run.batcher, window, resolve_users(ds, args.users, args.user_ids), args.split)
    if args.histories:
        requests += read_histories(args.histories, run.batcher, window)
    if args.item is not None:
        vid = ds.vocabs["item"].id(args.item)
        if vid == 0:
            raise UserError(f"--item {args.item}: unknown item id (not in the {ds.name} catalogue)")
        for r in requests:
            r.target_item = int(vid)
    torch.manual_seed(args.seed)
    records = generate(run, requests, opts, question=args.prompt, batch_size=args.batch_size)
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    if args.out:
        write_text(Path(args.out), lines)
        print(f"wrote {len(records)} generations to {args.out}")
    else:
        print(lines, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
