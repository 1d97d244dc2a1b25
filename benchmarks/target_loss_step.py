"""One training forward + backward of a run's User-LLM: the loss from the first target column on
(:func:`userllm.utils.hf.forward_with_target_loss`, what training uses) against the LLM's own loss over
every position, alternated in one process, one thread, CPU time per pair.

    python benchmarks/target_loss_step.py RUN_DIR [--pairs 60] [--batch-size 64]

RUN_DIR: a run of ``python -m userllm.train`` with the cross-attention integration (e.g. the main job's).
Prints the batch shape, the first target column, the median and IQR of each in ms and the ratio.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from userllm.data.examples import collate, make_examples
from userllm.factory import load_run
from userllm.utils.hf import IGNORE


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("--pairs", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=64)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    run = load_run(a.run_dir, threads=1)
    if run.cfg.integration != "xattn" or run.cfg.text_prompt:
        raise SystemExit(f"{a.run_dir}: a cross-attention User-LLM run is needed")
    model = run.model.train()
    ex = make_examples(run.ds, run.cfg.task, run.cfg.window, "train")
    lb = run.batcher.train_batch(collate(run.ds, ex, np.arange(min(a.batch_size, len(ex.labels)))))
    inp = lb.model_inputs()
    first = int((lb.labels != IGNORE).any(0).nonzero()[0])
    print(f"batch {tuple(lb.input_ids.shape)}, targets from column {first}")

    def from_first_target():
        model(**inp, labels=lb.labels).loss.backward()

    def every_position():
        with model.use_user_context(model.prepare_user_context(inp["features"], inp["lengths"])):
            out = model.llm(input_ids=inp["input_ids"], attention_mask=inp["attention_mask"], labels=lb.labels)
        out.loss.backward()

    fns = {"from the first target": from_first_target, "every position": every_position}
    for f in fns.values():                                   # warm-up
        f()
    times = {k: [] for k in fns}
    for i in range(a.pairs):
        for name in (list(fns) if i % 2 else list(fns)[::-1]):
            model.zero_grad(set_to_none=True)
            t = time.thread_time()
            fns[name]()
            times[name].append(time.thread_time() - t)
    for name, v in times.items():
        q1, med, q3 = np.percentile(np.array(v) * 1e3, [25, 50, 75])
        print(f"{name}: median {med:.1f} ms (IQR {q1:.1f}-{q3:.1f})")
    print(f"ratio every position / from the first target: "
          f"{np.median(times['every position']) / np.median(times['from the first target']):.3f}")


if __name__ == "__main__":
    main()
