"""The paper's results tables (arXiv 2402.13598, tables 2-8) on the data here, from one command, with seeds.

    python benchmarks/paper_table.py --seeds 3 --threads 1 --out runs/paper-table          # ml-latest-small
    python benchmarks/paper_table.py --rows full,enc --seeds 2 --tiny --out /tmp/pt          # synthetic, seconds

Every row of :data:`ROWS` is one ``python -m userllm.train`` command (stage 2); the rows that use a
pretrained encoder name one of :data:`ENCODERS` (one ``python -m userllm.pretrain`` command, stage 1),
which is trained once per seed and shared by every row that names it. Each run is a subprocess (one at a
time, ``OMP_NUM_THREADS`` = ``--threads``) with its own run directory under ``--out``:

    encoders/<encoder>/seed_<s>/   the pretraining run (encoder.safetensors, metrics.json)
    rows/<row>/seed_<s>/           the training run (metrics.json, as python -m userllm.train writes it)
    .../seed_<s>.json              the command, exit status, wall and CPU seconds of that run
    .../seed_<s>.log               its stdout and stderr

A run whose directory holds ``metrics.json`` is finished and is reused by a rerun (the same command is
required: another ``--steps`` into the same ``--out`` is an error); an unfinished one is continued with
``--resume``. Then every numeric leaf of each run's ``metrics.json`` (``test``, ``baselines``, ``train``)
is aggregated over the seeds into mean and sample standard deviation (ddof 1): ``table.json``,
``table.md`` (the headline metric of each task, ± std, beside the paper's figure) and ``table.png``
(error bars). :data:`FINDINGS` compares pairs of rows on one metric (the paper's claims) and says, by the
rule of :func:`verdict`, whether the difference on this data is resolved by the seeds.

``--tiny`` swaps the real data for small synthetic data and every size for a tiny one (the test,
``tests/test_paper_table.py``); ``--in-process`` runs the stages by calling their ``main`` in this
process instead (the imports, ~10 s per process, dominate tiny runs; CPU seconds are then this
process's).
"""

from __future__ import annotations

import json
import math
import os
import resource
import shlex
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:       # run as a script from a plain checkout
    sys.path.insert(0, str(REPO))

from userllm.cli import ArgumentParser, run_cli  # noqa: E402
from userllm.errors import UserError  # noqa: E402
from userllm.metrics import seed_stats  # noqa: E402
from userllm.utils.atomic import atomic_path, write_text  # noqa: E402

# --- what is run --------------------------------------------------------------------------------------

SHARED_DATA = Path(os.environ.get("USERLLM_SHARED_DATA", REPO.parent / "shared" / "data"))
# dataset key -> the reader options of both stages (paths relative to --data-dir)
DATASETS = {
    "ml-latest-small": ("--dataset", "movielens", "--data-path", "movielens/ml-latest-small"),
    "All_Beauty_5": ("--dataset", "amazon", "--data-path", "amazon/All_Beauty_5.json.gz"),
}
# --tiny: every dataset becomes this synthetic one (it has titles, genres and reviews, so every task runs)
TINY_DATA = ("--dataset", "synthetic", "--synthetic-users", "24", "--synthetic-items", "30",
             "--synthetic-events", "14")

# The main job's NextItem recipe on ml-latest-small (README, "User-LLM against TextPrompt"): window 20, the
# 400-step window-20 encoder, 300 steps of batch 32, lr 3e-3, the embedded LLM pretrained on the
# dataset's text (cached), 200 test users, 10 beams.
STAGE2_STEPS = 300
STAGE1_STEPS = 400
EVAL_USERS = 200
STAGE2_COMMON = ("--batch-size", "32")


@dataclass(frozen=True)
class Encoder:
    """One stage-1 command (``python -m userllm.pretrain`` options without --seed/--out/--steps)."""
    name: str
    data: str
    args: tuple[str, ...]
    steps: int | None = None       # None: --pretrain-steps; 0: the stage's own default length (--epochs)


@dataclass(frozen=True)
class Row:
    """One stage-2 command (``python -m userllm.train`` options without --seed/--out/--steps).

    ``encoder``: the :data:`ENCODERS` name whose checkpoint it reads, or None (TextPrompt, or a
    randomly initialised encoder with ``--pretrain-steps 0``). ``args`` None: no stage 2, the row is
    the encoder's own test result (full ranking of every item, all test users; a non-LLM baseline).
    ``paper``: the paper's figure for the same configuration on MovieLens-20M (Amazon for ReviewG)."""
    name: str
    label: str
    task: str
    encoder: str | None
    args: tuple[str, ...] | None
    data: str = "ml-latest-small"
    paper: str = "-"
    steps: int | None = None        # stage-2 steps of this row (None: --steps)
    eval_users: int | None = None   # test users of this row (None: --eval-users; 0 = all)


# the window-50 encoders' flags, shared by their variants below
_AR50 = ("--encoder", "ar", "--window", "50")
_DUAL50_ALL = ("--encoder", "dual", "--window", "50", "--dual-targets", "all", "--negatives", "all", "--item-bias")

ENCODERS = {e.name: e for e in (
    Encoder("ar-w20", "ml-latest-small", ("--encoder", "ar", "--window", "20")),
    Encoder("ar-w50", "ml-latest-small", _AR50),
    # the default window-50 encoder at its own default length (40 epochs; runs/enc50 of README's NextItem
    # section: test R@10 0.0590 in 7 min 40 s on two threads)
    Encoder("ar-w50-full", "ml-latest-small", _AR50, steps=0),
    Encoder("ar-beauty", "All_Beauty_5", ("--encoder", "ar", "--window", "10")),
    # the dual encoder at its own default length (2 epochs of stride-1 windows: 3,094 steps at window 50
    # on ml-latest-small; README's table), not --pretrain-steps: 400 steps would be 1/8 of an epoch
    Encoder("dual-w20", "ml-latest-small", ("--encoder", "dual", "--window", "20"), steps=0),
    # the dual encoder trained as the AR encoder is (README, "Stage 1"): every prefix of a window-50 window a
    # label, the exact softmax over the items with a per-item bias, 40 epochs (1,440 steps), no early stop
    Encoder("dual-w50-full", "ml-latest-small", _DUAL50_ALL, steps=0),
    # the gap between those two, taken apart (README "Stage 1", session 11): the dual encoder with the AR
    # head's form (a dot product with the item's input embedding, the AR encoder's learning rate), and the
    # AR encoder with its item head alone (no rating and genre heads)
    Encoder("dual-w50-dot-table", "ml-latest-small",
            _DUAL50_ALL + ("--dual-score", "dot", "--label-tower", "table", "--lr", "3e-3"), steps=0),
    Encoder("ar-w50-item", "ml-latest-small", _AR50 + ("--rating-weight", "0", "--category-weight", "0"), steps=0),
)}

_NI = ("--task", "nextitem")
_W20 = ("--window", "20")
ROWS = {r.name: r for r in (
    # Table 5: training strategies (NextItem R@1: Full 0.054, LoRA 0.053, Enc 0.052, Proj 0.040)
    Row("full", "User-LLM xattn, Full", "nextitem", "ar-w20", _NI + _W20 + ("--strategy", "full"),
        paper="R@1 0.054 (T5)"),
    Row("lora", "User-LLM xattn, LoRA", "nextitem", "ar-w20", _NI + _W20 + ("--strategy", "lora"),
        paper="R@1 0.053 (T5)"),
    Row("enc", "User-LLM xattn, Enc", "nextitem", "ar-w20", _NI + _W20 + ("--strategy", "enc"),
        paper="R@1 0.052 (T5)"),
    Row("proj", "User-LLM xattn, Proj", "nextitem", "ar-w20", _NI + _W20 + ("--strategy", "proj"),
        paper="R@1 0.040 (T5)"),
    # Table 8: soft prompt against cross-attention, random against pretrained encoder (Full)
    Row("softprompt", "User-LLM soft prompt, Full", "nextitem", "ar-w20",
        _NI + _W20 + ("--strategy", "full", "--integration", "softprompt"), paper="R@1 0.051 (T8)"),
    Row("random-encoder", "User-LLM xattn, Full, random encoder", "nextitem", None,
        _NI + _W20 + ("--strategy", "full", "--pretrain-steps", "0"), paper="R@1 0.041 (T8)"),
    # Table 7 / Fig. 3: TextPrompt against User-LLM at two history lengths, and the mixed context
    Row("tp10", "TextPrompt, 10 events (TP10)", "nextitem", None,
        _NI + ("--window", "10", "--baseline", "textprompt", "--strategy", "full"), paper="R@1 0.049 (T7)"),
    Row("ar10", "User-LLM xattn, Full, 10 events (AR10)", "nextitem", "ar-w20",
        _NI + ("--window", "10", "--strategy", "full"), paper="-"),
    Row("tp20", "TextPrompt, 20 events (TP20)", "nextitem", None,
        _NI + _W20 + ("--baseline", "textprompt", "--strategy", "full"), paper="R@1 0.060 (TP50, T7)"),
    Row("ar20tp10", "User-LLM xattn, Full, AR20 + TP10", "nextitem", "ar-w20",
        _NI + _W20 + ("--strategy", "full", "--text-events", "10"), paper="R@1 0.059 (AR50TP10, T7)"),
    # Table 6: Perceiver 50 -> 16 (window 50, its own encoder)
    Row("ar50", "User-LLM xattn, Full, 50 events", "nextitem", "ar-w50",
        _NI + ("--window", "50", "--strategy", "full"), paper="R@1 0.054 (T6)"),
    Row("ar50-perceiver16", "User-LLM xattn, Full, 50 events, Perceiver 16", "nextitem", "ar-w50",
        _NI + ("--window", "50", "--strategy", "full", "--perceiver-latents", "16"), paper="R@1 0.054 (T6)"),
    # Issue 14's NextItem recipe (README, "Session 10"): the window-50 encoder's 10 best next items as readout
    # tokens of 16 title tokens each, a pointer head over them, 1500 caption steps of Proj, exact decoding,
    # all 610 test users
    Row("pointer", "User-LLM xattn, Proj, 50 events, readout 10x16 + pointer, exact decoding", "nextitem",
        "ar-w50-full", _NI + ("--window", "50", "--strategy", "proj", "--readout-tokens", "10",
                              "--readout-title-tokens", "16", "--readout-pointer", "--xattn-gate-init", "0.5",
                              "--caption-steps", "1500", "--caption-replace", "1", "--distill-temperature", "0.2",
                              "--decoder", "exact"),
        paper="R@10 0.243 (T2)", steps=1500, eval_users=0),
    # Table 2: the dual-encoder baseline (its own next-item ranking)
    Row("dual-encoder", "Dual encoder alone (full ranking, all users)", "nextitem", "dual-w20", None,
        paper="R@10 0.206 (T2)"),
    # Tables 8 / 12: the two encoders side by side, each trained on every prefix of the same windows
    Row("dual-encoder-w50", "Dual encoder alone, window 50, every prefix a label (full ranking, all users)",
        "nextitem", "dual-w50-full", None, paper="R@10 0.206 (T2)"),
    Row("ar-encoder-w50", "AR encoder alone, window 50 (full ranking, all users)", "nextitem", "ar-w50-full", None,
        paper="-"),
    Row("dual-encoder-w50-dot", "Dual encoder alone, window 50, dot product with the item table (the AR head's form)",
        "nextitem", "dual-w50-dot-table", None, paper="-"),
    Row("ar-encoder-w50-item", "AR encoder alone, window 50, item head only (no rating / genre heads)",
        "nextitem", "ar-w50-item", None, paper="-"),
    # Table 4 / 5: FavGenre beside NextItem
    Row("favgenre-full", "User-LLM xattn, Full, FavGenre", "favgenre", "ar-w20",
        ("--task", "favgenre") + _W20 + ("--strategy", "full"), paper="R@1 0.785 (T4)"),
    Row("favgenre-enc", "User-LLM xattn, Enc, FavGenre", "favgenre", "ar-w20",
        ("--task", "favgenre") + _W20 + ("--strategy", "enc"), paper="R@1 0.783 (T5)"),
    # Table 8 on FavGenre (cross-attention 0.785, random encoder 0.778, soft prompt 0.787 in the paper):
    # NextItem through the LLM is at popularity's level here, FavGenre is far above it (README)
    Row("favgenre-random-encoder", "User-LLM xattn, Full, random encoder, FavGenre", "favgenre", None,
        ("--task", "favgenre") + _W20 + ("--strategy", "full", "--pretrain-steps", "0"), paper="R@1 0.778 (T8)"),
    Row("favgenre-softprompt", "User-LLM soft prompt, Full, FavGenre", "favgenre", "ar-w20",
        ("--task", "favgenre") + _W20 + ("--strategy", "full", "--integration", "softprompt"),
        paper="R@1 0.787 (T8)"),
    Row("favgenre-tp20", "TextPrompt, 20 events, FavGenre", "favgenre", None,
        ("--task", "favgenre") + _W20 + ("--baseline", "textprompt", "--strategy", "full"),
        paper="R@1 0.788 (T4)"),
    # Table 4: review generation (ROUGE-Lsum x 100 in the paper) on Amazon All_Beauty_5
    Row("reviewg", "User-LLM xattn, Full, ReviewG (All_Beauty_5)", "reviewg", "ar-beauty",
        ("--task", "reviewg", "--window", "10", "--strategy", "full"), data="All_Beauty_5",
        paper="ROUGE-Lsum 26.38 (T4, Amazon)"),
    Row("reviewg-tp", "TextPrompt, ReviewG (All_Beauty_5)", "reviewg", None,
        ("--task", "reviewg", "--window", "10", "--baseline", "textprompt", "--strategy", "full"),
        data="All_Beauty_5", paper="ROUGE-Lsum 22.82 (T4, Amazon)"),
)}

# the headline metric of each task (a key of a run's "test" section), for table.md's first column and
# the plot
HEADLINE = {"nextitem": "recall@10", "favgenre": "recall@1", "reviewg": "rougeLsum"}


@dataclass(frozen=True)
class Finding:
    """A claim of the paper: row ``a`` relation row ``b`` on ``metric`` (a dotted key of the aggregate;
    ``b_metric`` for ``b`` when it differs, e.g. a baseline inside the same run)."""
    claim: str
    a: str
    relation: str            # ">", ">=" or "~"
    b: str
    metric: str
    paper: str
    b_metric: str | None = None


FINDINGS = (
    Finding("Enc ~ Full (NextItem)", "enc", "~", "full", "test.recall@10", "R@1 0.052 vs 0.054 (T5)"),
    Finding("Enc ~ Full (FavGenre)", "favgenre-enc", "~", "favgenre-full", "test.recall@1", "0.783 vs 0.785 (T5)"),
    Finding("LoRA ~ Full", "lora", "~", "full", "test.recall@10", "R@1 0.053 vs 0.054 (T5)"),
    Finding("Proj < Full", "full", ">", "proj", "test.recall@10", "R@1 0.054 vs 0.040 (T5)"),
    Finding("pretrained > random encoder", "full", ">", "random-encoder", "test.recall@10",
            "R@1 0.054 vs 0.041 (T8)"),
    Finding("cross-attention >= soft prompt", "full", ">=", "softprompt", "test.recall@10",
            "R@1 0.054 vs 0.051 (T8)"),
    Finding("pretrained > random encoder (FavGenre)", "favgenre-full", ">", "favgenre-random-encoder",
            "test.recall@1", "0.785 vs 0.778 (T8)"),
    Finding("cross-attention >= soft prompt (FavGenre)", "favgenre-full", ">=", "favgenre-softprompt",
            "test.recall@1", "0.785 vs 0.787 (T8: soft prompt ahead on MovieLens FavGenre)"),
    Finding("Perceiver 50 -> 16 keeps quality", "ar50-perceiver16", "~", "ar50", "test.recall@10",
            "R@1 0.054 vs 0.054 (T6)"),
    Finding("TextPrompt ahead at short histories", "tp10", ">", "ar10", "test.recall@10",
            "Fig. 3: TP ahead at 50 events"),
    Finding("User-LLM ahead at long histories", "full", ">", "tp20", "test.recall@10",
            "Fig. 3: User-LLM ahead at 100-200 events"),
    Finding("AR-N + TP-10 > TP-10", "ar20tp10", ">", "tp10", "test.recall@10", "R@1 0.059 vs 0.049 (T7)"),
    Finding("AR-N + TP-10 > AR-N", "ar20tp10", ">", "full", "test.recall@10", "R@1 0.059 vs 0.054 (T7)"),
    Finding("User-LLM > popularity (NextItem)", "full", ">", "full", "test.recall@10",
            "not in the paper (issue 14's floor)", b_metric="baselines.popularity.recall@10"),
    Finding("User-LLM > dual encoder (NextItem)", "full", ">", "dual-encoder", "test.recall@10",
            "R@10 0.243 vs 0.206 (T2)"),
    Finding("User-LLM with readout + pointer > popularity (NextItem)", "pointer", ">", "pointer", "test.recall@10",
            "not in the paper (issue 14's floor)", b_metric="baselines.popularity.recall@10"),
    Finding("User-LLM with readout + pointer ~ its encoder (NextItem)", "pointer", "~", "pointer",
            "test.recall@10", "not in the paper (issue 14: >= 2/3 of the encoder's own)",
            b_metric="baselines.encoder.recall@10"),
    Finding("User-LLM with readout + pointer > dual encoder (NextItem)", "pointer", ">", "dual-encoder",
            "test.recall@10", "R@10 0.243 vs 0.206 (T2)"),
    Finding("User-LLM with readout + pointer > dual encoder trained as long (NextItem)", "pointer", ">",
            "dual-encoder-w50", "test.recall@10", "R@10 0.243 vs 0.206 (T2)"),
    Finding("AR encoder > dual encoder (NextItem, encoders alone)", "ar-encoder-w50", ">", "dual-encoder-w50",
            "test.recall@10", "T8 / T12: User-LLM with the AR encoder ahead of it with the dual encoder"),
    Finding("User-LLM ~ TextPrompt (FavGenre)", "favgenre-full", "~", "favgenre-tp20", "test.recall@1",
            "0.785 vs 0.788 (T4)"),
    Finding("User-LLM > TextPrompt (ReviewG)", "reviewg", ">", "reviewg-tp", "test.rougeLsum",
            "26.38 vs 22.82 (T4, Amazon)"),
)

# --tiny: sizes of both stages, and the flags whose values shrink (divided, at least 1)
TINY_STAGE1 = ("--d-model", "16", "--layers", "1", "--batch-size", "8", "--warmup", "1", "--max-eval-users", "8")
TINY_STAGE2 = ("--llm-hidden", "32", "--llm-layers", "1", "--tokenizer-vocab", "400", "--encoder-dim", "16",
               "--encoder-layers", "1", "--llm-pretrain-steps", "0", "--batch-size", "8", "--warmup", "1",
               "--beams", "10", "--eval-batch-size", "4", "--checkpoint-every", "100")
TINY_DIVIDE = {"--window": 5, "--text-events": 5, "--perceiver-latents": 4}
TINY_STEPS = (4, 6)           # stage 1, stage 2
TINY_CAPPED = ("--caption-steps", "--distill-steps")   # cut to the tiny stage-2 steps
TINY_EVAL_USERS = 4

RUN_FILE = "metrics.json"     # what every finished run of either stage writes last


# --- commands -----------------------------------------------------------------------------------------

@dataclass
class Options:
    seeds: int
    rows: list[str]
    steps: int
    pretrain_steps: int
    eval_users: int
    threads: int
    out: Path
    data_dir: Path
    tiny: bool
    in_process: bool
    dry_run: bool
    aggregate_only: bool = False
    extra: list[str] = field(default_factory=list)
    cache_dir: Path | None = None


def _shrink(args: Sequence[str]) -> list[str]:
    out = list(args)
    for i, a in enumerate(out[:-1]):
        if a in TINY_DIVIDE:
            out[i + 1] = str(max(1, int(out[i + 1]) // TINY_DIVIDE[a]))
    return out


def _data_args(key: str, opts: Options) -> list[str]:
    cache = [] if opts.cache_dir is None else ["--cache-dir", str(opts.cache_dir)]
    if opts.tiny:
        return list(TINY_DATA) + cache
    args = list(DATASETS[key])
    i = args.index("--data-path") + 1
    args[i] = str(opts.data_dir / args[i])
    return args + cache


def encoder_dir(opts: Options, name: str, seed: int) -> Path:
    return opts.out / "encoders" / name / f"seed_{seed}"


def row_dir(opts: Options, name: str, seed: int) -> Path:
    return opts.out / "rows" / name / f"seed_{seed}"


def stage1_argv(opts: Options, enc: Encoder, seed: int) -> list[str]:
    steps = TINY_STEPS[0] if opts.tiny else opts.pretrain_steps if enc.steps is None else enc.steps
    args = _data_args(enc.data, opts) + list(enc.args) + [
        "--steps", str(steps), "--threads", str(opts.threads), "--seed", str(seed),
        "--out", str(encoder_dir(opts, enc.name, seed))]
    return _shrink(args + list(TINY_STAGE1)) if opts.tiny else args


def stage2_argv(opts: Options, row: Row, seed: int) -> list[str]:
    steps = TINY_STEPS[1] if opts.tiny else opts.steps if row.steps is None else row.steps
    users = TINY_EVAL_USERS if opts.tiny else opts.eval_users if row.eval_users is None else row.eval_users
    args = _data_args(row.data, opts) + list(STAGE2_COMMON) + list(row.args) + list(opts.extra)
    if opts.tiny:                               # a row's own stage lengths shrink with the rest
        args = [str(min(int(a), steps)) if i and args[i - 1] in TINY_CAPPED else a for i, a in enumerate(args)]
    if row.encoder is not None:
        args += ["--encoder-checkpoint", str(encoder_dir(opts, row.encoder, seed) / "encoder.safetensors")]
    args += ["--steps", str(steps), "--eval-users", str(users),
             "--threads", str(opts.threads), "--seed", str(seed), "--out", str(row_dir(opts, row.name, seed))]
    return _shrink(args + list(TINY_STAGE2)) if opts.tiny else args


# --- running ------------------------------------------------------------------------------------------

def _comparable(argv: Sequence[str]) -> list[str]:
    """The argv without --threads (a rerun on another core count may reuse a run)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--threads":
            skip = True
        else:
            out.append(a)
    return out


def _launch(module: str, argv: list[str], log_path: Path, opts: Options) -> tuple[int, float, float]:
    """Run ``python -m module argv``; (exit status, wall s, CPU s = user + system)."""
    if opts.in_process:
        import contextlib
        import importlib

        main = importlib.import_module(module).main
        t0, c0 = time.monotonic(), time.process_time()
        with open(log_path, "w") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
            rc = run_cli(main, argv)
        return rc, time.monotonic() - t0, time.process_time() - c0
    env = dict(os.environ, OMP_NUM_THREADS=str(opts.threads))
    t0 = time.monotonic()
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(log_path, "w") as f:
        rc = subprocess.run([sys.executable, "-m", module, *argv], stdout=f, stderr=subprocess.STDOUT, env=env,
                            cwd=os.getcwd()).returncode
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    return rc, time.monotonic() - t0, cpu


def run_once(module: str, argv: list[str], run: Path, opts: Options, log=print) -> dict:
    """Run (or reuse) one stage: the record of ``<run>.json`` ({argv, rc, wall_s, cpu_s, reused})."""
    record_path = run.with_suffix(".json")
    record = json.loads(record_path.read_text()) if record_path.is_file() else None
    if record is not None and _comparable(record["argv"]) != _comparable(argv):
        raise UserError(f"--out {opts.out}: {run} was run with other options "
                        f"({shlex.join(record['argv'])}); choose another --out")
    if (run / RUN_FILE).is_file():
        log(f"  reusing {run}")
        return {**(record or {"argv": argv, "wall_s": None, "cpu_s": None}), "rc": 0, "reused": True}
    if opts.aggregate_only:
        log(f"  not finished, left out: {run}")
        return {"argv": argv, "rc": "not run", "wall_s": None, "cpu_s": None, "reused": False}
    resume = run.is_dir()
    full = argv + (["--resume"] if resume else [])
    log(f"  {'resuming' if resume else 'running'} python -m {module} {shlex.join(full)}")
    if opts.dry_run:
        return {"argv": argv, "rc": None, "wall_s": None, "cpu_s": None, "reused": False}
    run.parent.mkdir(parents=True, exist_ok=True)
    write_text(record_path, json.dumps({"argv": argv, "rc": None}, indent=1))
    rc, wall, cpu = _launch(module, full, run.with_suffix(".log"), opts)
    if rc == 0 and not (run / RUN_FILE).is_file():
        rc = -1                                  # the stage claimed success without its results
    record = {"argv": argv, "rc": rc, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
              "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    write_text(record_path, json.dumps(record, indent=1))
    log(f"    exit {rc}, {wall:.0f} s wall, {cpu:.0f} CPU s" + ("" if rc == 0 else f"; see {run.with_suffix('.log')}"))
    return {**record, "reused": False}


def flatten(metrics: dict, sections: Sequence[str] = ("test", "baselines", "train")) -> dict[str, float]:
    """Dotted keys -> numbers of ``metrics`` under ``sections`` (lists by index; strings, samples skipped)."""
    out: dict[str, float] = {}

    def walk(prefix: str, v) -> None:
        if isinstance(v, bool):
            return
        if isinstance(v, (int, float)):
            if math.isfinite(v):
                out[prefix] = float(v)
        elif isinstance(v, dict):
            for k, x in v.items():
                if k != "samples":
                    walk(f"{prefix}.{k}", x)
        elif isinstance(v, list):
            for i, x in enumerate(v):
                walk(f"{prefix}.{i}", x)

    for s in sections:
        if s in metrics:
            walk(s, metrics[s])
    return out


def mean_std(values: Sequence[float]) -> dict:
    """{"mean", "std" (sample, ddof 1; 0 for one value), "n", "values"}."""
    return {**seed_stats(values), "n": len(values)}


def aggregate(per_seed: Sequence[dict[str, float]]) -> dict[str, dict]:
    """{key: mean_std over the seeds that have the key}, keys in first-seen order."""
    keys: list[str] = []
    for m in per_seed:
        keys += [k for k in m if k not in keys]
    return {k: mean_std([m[k] for m in per_seed if k in m]) for k in keys}


def verdict(f: Finding, a: dict | None, b: dict | None, users_a: float | None = None,
            users_b: float | None = None) -> dict:
    """Whether this data shows ``f``: the difference d = mean(a) - mean(b) against its standard error se.

    se^2 = var_a + var_b, each the larger of the spread over seeds (std^2 / seeds) and, for a recall
    (a proportion) with ``users_*`` test users per seed, the binomial floor p (1 - p) / (users x seeds):
    with 3 seeds the sample std alone can be 0 by chance (1 hit in 200 users in every seed).

    With one seed and no such floor (ROUGE, say) nothing measures the noise: not resolved, se None.

    ``>``: reproduced when d > 2 se, reversed when d < -2 se, else not resolved. ``>=``: reproduced when
    d > 2 se, consistent when |d| <= 2 se, reversed below. ``~``: not resolved when 2 se exceeds 25% of the
    larger mean (a gap like the paper's Proj vs Full, 26%, would go unseen); else reproduced when
    |d| <= max(2 se, 10% of the larger mean) (the paper's "comparable": Enc 0.052 vs Full 0.054 is 4%),
    not reproduced otherwise."""
    if a is None or b is None:
        return {"claim": f.claim, "a": f.a, "b": f.b, "verdict": "not run", "paper": f.paper}

    def var(m: dict, users: float | None) -> float | None:
        """None when nothing measures the noise: one seed (no spread) and no binomial floor (not a recall)."""
        floor = users and 0.0 <= m["mean"] <= 1.0 and "recall" in f.metric
        if m["n"] < 2 and not floor:
            return None
        v = m["std"] ** 2 / m["n"]
        return max(v, m["mean"] * (1 - m["mean"]) / (users * m["n"])) if floor else v

    d = a["mean"] - b["mean"]
    va, vb = var(a, users_a), var(b, users_b)
    se = math.sqrt(va + vb) if va is not None and vb is not None else None
    top = max(abs(a["mean"]), abs(b["mean"]))
    if se is None:
        v = "not resolved (one seed: no spread to judge by)"
    elif f.relation == "~":
        if 2 * se > 0.25 * top:
            v = "not resolved (noise >= 25% of the value)"
        else:
            v = "reproduced" if abs(d) <= max(2 * se, 0.1 * top) else "not reproduced"
    elif d > 2 * se:
        v = "reproduced"
    elif d < -2 * se:
        v = "not reproduced (reversed)"
    else:
        v = "consistent (equal within noise)" if f.relation == ">=" else "not resolved (within noise)"
    return {"claim": f.claim, "a": f.a, "b": f.b, "metric": f.metric, "b_metric": f.b_metric or f.metric,
            "relation": f.relation, "a_mean": a["mean"], "b_mean": b["mean"], "diff": d, "se": se,
            "verdict": v, "paper": f.paper}


def _as_row(key: str) -> str:
    """A stage-1 metric key as the row keys of a stage-2 run: test.encoder.X -> test.X,
    test.popularity.X -> baselines.popularity.X."""
    if key.startswith("test.encoder."):
        return "test." + key[len("test.encoder."):]
    if key.startswith("test.popularity."):
        return "baselines.popularity." + key[len("test.popularity."):]
    return key


# --- output -------------------------------------------------------------------------------------------

def _cell(agg: dict, key: str, digits: int = 4) -> str:
    v = agg.get(key)
    if v is None:
        return "-"
    return f"{v['mean']:.{digits}f}" + (f" ± {v['std']:.{digits}f}" if v["n"] > 1 else "")


def format_table(table: dict) -> str:
    lines = [f"{table['title']}", "",
             "| row | task | headline metric | R@1 | R@5 | R@10 | ROUGE-Lsum | test loss | gain(shuf) | "
             "popularity | encoder (own head) R@10 | seeds | train s | CPU s / run | paper |",
             "| --- |" + " --- |" * 14]
    for name, r in table["rows"].items():
        agg, task = r["metrics"], r["task"]
        head = HEADLINE[task]
        pop = "baselines.popularity." + (head if task != "reviewg" else "none")
        lines.append(" | ".join([
            f"| {r['label']} (`{name}`)", task, head, _cell(agg, "test.recall@1"), _cell(agg, "test.recall@5"),
            _cell(agg, "test.recall@10"), _cell(agg, "test.rougeLsum"), _cell(agg, "test.loss", 3),
            _cell(agg, "test.context_gain"), _cell(agg, pop), _cell(agg, "baselines.encoder.recall@10"),
            f"{r['seeds_done']}/{r['seeds_asked']}", _cell(agg, "train.train_seconds", 0), _cell(agg, "cpu_s", 0),
            r["paper"]]) + " |")
    if table["encoders"]:
        lines += ["", "Stage 1 (the shared encoders; test split, full ranking, all users):", "",
                  "| encoder | R@1 | R@5 | R@10 | popularity R@10 | seeds | CPU s / run |", "| --- |" + " --- |" * 6]
        for name, e in table["encoders"].items():
            agg = e["metrics"]
            lines.append(f"| `{name}` | {_cell(agg, 'test.encoder.recall@1')} | "
                         f"{_cell(agg, 'test.encoder.recall@5')} | "
                         f"{_cell(agg, 'test.encoder.recall@10')} | {_cell(agg, 'test.popularity.recall@10')} | "
                         f"{e['seeds_done']}/{e['seeds_asked']} | {_cell(agg, 'cpu_s', 0)} |")
    if table["findings"]:
        lines += ["", "The paper's findings (d = mean(a) - mean(b), se over seeds and test users; rule: `verdict` "
                  "in benchmarks/paper_table.py):", "",
                  "| finding | a | b | metric | mean a | mean b | d ± se | verdict | paper |",
                  "| --- |" + " --- |" * 8]
        for f in table["findings"]:
            if "diff" not in f:
                lines.append(f"| {f['claim']} | `{f['a']}` | `{f['b']}` | - | - | - | - | {f['verdict']} | "
                             f"{f['paper']} |")
                continue
            metric = f["metric"] if f["b_metric"] == f["metric"] else f"{f['metric']} vs {f['b_metric']}"
            se = "-" if f["se"] is None else f"{f['se']:.4f}"
            lines.append(f"| {f['claim']} | `{f['a']}` | `{f['b']}` | {metric} | {f['a_mean']:.4f} | "
                         f"{f['b_mean']:.4f} | {f['diff']:+.4f} ± {se} | {f['verdict']} | {f['paper']} |")
    return "\n".join(lines) + "\n"


def plot(table: dict, path: Path) -> None:
    """One panel per task: each row's headline metric (mean, error bar = std over seeds), popularity's on
    the same users as a dashed segment over its bar where there is one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in HEADLINE if any(r["task"] == t for r in table["rows"].values())]
    fig, axes = plt.subplots(1, max(1, len(tasks)), figsize=(5 + 4 * len(tasks), 5), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        key = "test." + HEADLINE[task]
        rows = [(n, r) for n, r in table["rows"].items() if r["task"] == task and key in r["metrics"]]
        means = [r["metrics"][key]["mean"] for _, r in rows]
        stds = [r["metrics"][key]["std"] for _, r in rows]
        ax.bar(range(len(rows)), means, yerr=stds, capsize=4, color="tab:blue")
        ax.set_xticks(range(len(rows)), [f"{n} (n={r['metrics'][key]['n']})" for n, r in rows], rotation=60,
                      ha="right", fontsize=8)
        # popularity per bar: rows differ in their test users (200 or all), and so does popularity's figure
        pop_key = "baselines.popularity." + HEADLINE[task]
        pops = [(i, r["metrics"][pop_key]["mean"]) for i, (_, r) in enumerate(rows) if pop_key in r["metrics"]]
        for j, (i, pop) in enumerate(pops):
            ax.hlines(pop, i - 0.45, i + 0.45, colors="tab:red", linestyles="--",
                      label="popularity (same users)" if j == 0 else None)
        if pops:
            ax.legend(fontsize=8)
        ax.set_title(f"{task}: {HEADLINE[task]}")
    fig.suptitle("\n".join(textwrap.wrap(table["title"], width=60 + 45 * len(tasks))), fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


# --- the command --------------------------------------------------------------------------------------

def parse(argv: Sequence[str] | None) -> Options:
    ap = ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=3, help="seeds 0..S-1 of every run")
    ap.add_argument("--rows", default="all", help="comma-separated row names (all: " + ", ".join(ROWS) + ")")
    ap.add_argument("--steps", type=int, default=STAGE2_STEPS, help="stage-2 training steps of every row")
    ap.add_argument("--pretrain-steps", type=int, default=STAGE1_STEPS, help="stage-1 steps of every encoder")
    ap.add_argument("--eval-users", type=int, default=EVAL_USERS, help="test users of stage 2 (0 = all)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of every run (OMP_NUM_THREADS)")
    ap.add_argument("--out", type=Path, default=Path("runs/paper-table"), help="output directory")
    ap.add_argument("--data-dir", type=Path, default=SHARED_DATA, help="directory holding movielens/ and amazon/")
    ap.add_argument("--cache-dir", type=Path, default=None,
                    help="processed-data cache of both stages (default: theirs, $USERLLM_CACHE or ~/.cache/userllm)")
    ap.add_argument("--tiny", action="store_true", help="synthetic data and tiny sizes (the test)")
    ap.add_argument("--in-process", action="store_true", help="run the stages in this process, not as subprocesses")
    ap.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    ap.add_argument("--aggregate-only", action="store_true",
                    help="run nothing: the table of the runs already finished (e.g. after the time ran out)")
    ap.add_argument("--train-arg", action="append", default=[], metavar="ARG",
                    help="extra python -m userllm.train argument for every row (repeat; e.g. --train-arg=--beams)")
    a = ap.parse_args(argv)
    if a.seeds < 1:
        raise UserError(f"--seeds: must be >= 1, got {a.seeds}")
    for flag, v in (("--steps", a.steps), ("--pretrain-steps", a.pretrain_steps), ("--threads", a.threads)):
        if v < 1:
            raise UserError(f"{flag}: must be >= 1, got {v}")
    if a.eval_users < 0:
        raise UserError(f"--eval-users: must be >= 0, got {a.eval_users}")
    rows = list(ROWS) if a.rows == "all" else [r.strip() for r in a.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown or not rows:
        raise UserError(f"--rows: unknown row {unknown[0] if unknown else repr(a.rows)} (rows: {', '.join(ROWS)})")
    opts = Options(a.seeds, list(dict.fromkeys(rows)), a.steps, a.pretrain_steps, a.eval_users, a.threads,
                   a.out, a.data_dir, a.tiny, a.in_process, a.dry_run, a.aggregate_only, a.train_arg,
                   a.cache_dir)
    if not opts.tiny:
        for key in {ROWS[r].data for r in opts.rows}:
            p = Path(_data_args(key, opts)[3])
            if not p.exists():
                raise UserError(f"--data-dir {opts.data_dir}: {p} not found (row data {key})")
    return opts


def run(opts: Options, log=print) -> dict:
    """Every run (or reuse), then table.json / table.md / table.png in ``opts.out``; the table dict."""
    seeds = list(range(opts.seeds))
    rows = [ROWS[r] for r in opts.rows]
    encoders = [ENCODERS[n] for n in dict.fromkeys(r.encoder for r in rows if r.encoder is not None)]
    records: dict[tuple[str, str, int], dict] = {}
    started = time.monotonic()
    for seed in seeds:            # seed-major, rows in --rows order: an interrupted run has whole seeds
        for row in rows:
            enc = ENCODERS.get(row.encoder)
            if enc is not None and ("encoders", enc.name, seed) not in records:   # when first needed
                log(f"[seed {seed}] encoder {enc.name}")
                records["encoders", enc.name, seed] = run_once("userllm.pretrain", stage1_argv(opts, enc, seed),
                                                               encoder_dir(opts, enc.name, seed), opts, log)
            if row.args is None:                 # the encoder's own result: nothing more to run
                records["rows", row.name, seed] = records["encoders", row.encoder, seed]
                continue
            if row.encoder is not None and records["encoders", row.encoder, seed]["rc"] not in (0, None):
                log(f"[seed {seed}] row {row.name}: skipped, its encoder failed")
                records["rows", row.name, seed] = {"rc": "encoder failed"}
                continue
            log(f"[seed {seed}] row {row.name}")
            records["rows", row.name, seed] = run_once("userllm.train", stage2_argv(opts, row, seed),
                                                       row_dir(opts, row.name, seed), opts, log)
    if opts.dry_run:
        return {}

    def collect(kind: str, name: str, directory) -> dict:
        per_seed = []
        for s in seeds:
            path = directory(opts, name, s) / RUN_FILE
            if records[kind, name, s].get("rc") == 0 and path.is_file():
                m = json.loads(path.read_text())
                flat = flatten(m) if kind == "rows" else flatten(m, ("test",))
                if records[kind, name, s].get("cpu_s") is not None:
                    flat["cpu_s"] = records[kind, name, s]["cpu_s"]
                    flat["wall_s"] = records[kind, name, s]["wall_s"]
                per_seed.append(flat)
        return {"seeds_asked": len(seeds), "seeds_done": len(per_seed),
                "metrics": aggregate(per_seed) if per_seed else {}}

    table_encoders = {e.name: {"data": e.data,
                               "command": "python -m userllm.pretrain " + shlex.join(stage1_argv(opts, e, 0)),
                               **collect("encoders", e.name, encoder_dir)} for e in encoders}
    table_rows = {}
    for r in rows:
        if r.args is None:
            enc = table_encoders[r.encoder]
            result = {**enc, "metrics": {_as_row(k): v for k, v in enc["metrics"].items()}}
        else:
            result = {"command": "python -m userllm.train " + shlex.join(stage2_argv(opts, r, 0)),
                      **collect("rows", r.name, row_dir)}
        table_rows[r.name] = {"label": r.label, "task": r.task, "data": r.data, "encoder": r.encoder,
                              "paper": r.paper, **result}
    findings = []
    for f in FINDINGS:
        ma, mb = (table_rows[r]["metrics"] if r in table_rows else {} for r in (f.a, f.b))
        key_b = f.b_metric or f.metric
        users = [m.get(k.rsplit(".", 1)[0] + ".count", {}).get("mean") for m, k in ((ma, f.metric), (mb, key_b))]
        findings.append(verdict(f, ma.get(f.metric), mb.get(key_b), *users))
    data = "synthetic (--tiny)" if opts.tiny else ", ".join(sorted({r.data for r in rows}))
    title = (f"User-LLM paper table on {data}: seed{'s 0-' if len(seeds) > 1 else ' '}{seeds[-1]} (mean ± std over the seeds finished, "
             f"n), stage 2 {TINY_STEPS[1] if opts.tiny else opts.steps} steps, stage 1 "
             f"{TINY_STEPS[0] if opts.tiny else opts.pretrain_steps} steps, "
             f"{TINY_EVAL_USERS if opts.tiny else (opts.eval_users or 'all')} test users"
             + (" (rows that set their own steps or users: theirs)"
                if any(r.steps is not None or r.eval_users is not None for r in rows) else "")
             + ("; the encoders alone: all test users, at their own length where they set one"
                if not opts.tiny and any(r.args is None for r in rows) else ""))
    table = {"title": title, "seeds": seeds, "rows": table_rows, "encoders": table_encoders, "findings": findings,
             "command": "python benchmarks/paper_table.py " + shlex.join(sys.argv[1:]) if sys.argv else "",
             "runner_wall_s": round(time.monotonic() - started, 1)}
    opts.out.mkdir(parents=True, exist_ok=True)
    write_text(opts.out / "table.json", json.dumps(table, indent=1))
    write_text(opts.out / "table.md", format_table(table))
    plot(table, opts.out / "table.png")
    log("")
    log(format_table(table))
    log(f"wrote {opts.out}/table.json, table.md, table.png")
    return table


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse(argv)
    table = run(opts)
    failed = [f"{n} ({r['seeds_done']}/{r['seeds_asked']} seeds)" for n, r in table.get("rows", {}).items()
              if r["seeds_done"] < r["seeds_asked"]]
    if failed:
        print(f"error: runs failed or not run: {', '.join(failed)}; see their seed_<s>.log under {opts.out}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
