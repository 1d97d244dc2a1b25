"""python -m userllm.train on tiny settings: every integration x strategy learns, resume is exact,
bad options are clean errors, and the TextPrompt baseline / mixed context run."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from userllm.cli import run_cli
from userllm.config import TrainConfig
from userllm.train import main, train
from userllm.runs import read_jsonl

REPO = Path(__file__).resolve().parents[1]


def tiny_args(cache: Path, out: Path, **over) -> list[str]:
    opts = dict(synthetic_users=24, synthetic_items=30, synthetic_events=12, window=6, llm_hidden=32,
                llm_layers=2, tokenizer_vocab=400, encoder_dim=16, encoder_layers=1, pretrain_steps=0,
                llm_pretrain_steps=0,  # the LLM-pretraining cache is tested in test_llm_pretrain.py
                steps=12, batch_size=8, lr=1e-2, warmup=2, eval_users=4, beams=5, eval_batch_size=4,
                threads=1, log_every=1, checkpoint_every=100, cache_dir=cache, out=out)
    opts.update(over)
    argv = []
    for k, v in opts.items():
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            argv.append(flag if v else "--no-" + flag[2:])
        else:
            argv += [flag, str(v)]
    return argv


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def pretrained_llm(cache, tmp_path_factory):
    """A tiny LLM that has learnt the catalogue's titles (TextPrompt run, exported as an HF directory).

    The frozen-LLM strategies (lora/enc/proj) need an LLM that is not random: a randomly initialised LLM
    has near-uniform logits whatever its input, so only its own weights could lower the loss.
    """
    from userllm.checkpoint import latest_checkpoint, load_checkpoint
    from userllm.llm import load_llm_spec

    run = tmp_path_factory.mktemp("lm") / "run"
    run_train(tiny_args(cache, run, baseline="textprompt", strategy="full", steps=30, eval_users=1))
    model, tok = load_llm_spec(run / "llm")
    load_checkpoint(latest_checkpoint(run), {"llm": model}, restore_rng_state=False)
    dest = run.parent / "hf"
    model.save_pretrained(dest)
    tok.save_pretrained(dest)
    return dest


def run_train(argv):
    from userllm.config import parse_config

    return train(parse_config(argv))


def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl")]


@pytest.mark.parametrize("integration, strategy, extra", [
    ("xattn", "full", {}), ("xattn", "lora", {}), ("xattn", "enc", {}), ("xattn", "proj", {}),
    ("softprompt", "full", {}), ("softprompt", "lora", {}), ("softprompt", "enc", {}), ("softprompt", "proj", {}),
    ("xattn", "enc", {"perceiver_latents": 3}), ("softprompt", "enc", {"perceiver_latents": 3}),
    ("xattn", "full", {"baseline": "textprompt"}), ("xattn", "lora", {"baseline": "textprompt"}),
    ("xattn", "enc", {"text_events": 2}),
])
def test_every_combination_trains_and_its_loss_goes_down(tmp_path, cache, pretrained_llm, integration, strategy,
                                                         extra):
    out = tmp_path / "run"
    if strategy != "full":
        extra = {**extra, "llm": pretrained_llm}
    # One fixed batch (8 examples, batch size 8): every step sees the same data, so the loss must fall.
    results = run_train(tiny_args(cache, out, integration=integration, strategy=strategy, max_train_examples=8,
                                  lr=5e-2 if integration == "softprompt" and strategy in ("enc", "proj") else 2e-2,
                                  **extra))
    ls = losses(out)
    assert len(ls) == 12
    # Dropout alone moves these losses by ~0.001 (measured with --lr 0); a tiny frozen LLM lets a soft
    # prompt lower them only by ~0.01, the other combinations by far more.
    assert sum(ls[-3:]) / 3 < sum(ls[:3]) / 3 - 0.005 and ls[-1] < ls[0], ls
    test = results["test"]
    assert test["count"] == 4 and 0.0 <= test["recall@1"] <= test["recall@5"] <= 1.0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["integration"] == integration and cfg["strategy"] == strategy
    assert json.loads((out / "metrics.json").read_text())["model"] == TrainConfig.from_dict(
        {k: v for k, v in cfg.items()}).model_name
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000012.safetensors"]


def test_resume_continues_with_the_same_losses(tmp_path, cache):
    a, b = tmp_path / "a", tmp_path / "b"
    common = dict(steps=8, checkpoint_every=4, pretrain_steps=3, strategy="full")
    run_train(tiny_args(cache, a, **common))
    full = losses(a)
    # Simulate a run killed after its step-4 checkpoint: a copy without the later checkpoint/results.
    shutil.copytree(a, b)
    (b / "checkpoints" / "step_00000008.safetensors").unlink()
    (b / "metrics.json").unlink()
    with open(b / "metrics.jsonl", "a") as fh:  # a half-written log line of the dead run after step 4
        fh.write(json.dumps({"step": 5, "loss": 123.0}) + "\n")
    run_train(tiny_args(cache, b, resume=True, **common))
    assert losses(b) == full  # exactly, on CPU
    assert [r["step"] for r in read_jsonl(b / "metrics.jsonl")] == list(range(1, 9))
    ra = json.loads((a / "metrics.json").read_text())["test"]
    rb = json.loads((b / "metrics.json").read_text())["test"]
    assert ra["recall@5"] == rb["recall@5"] and ra["loss"] == pytest.approx(rb["loss"], abs=1e-6)


def test_resume_rules(tmp_path, cache, capsys):
    out = tmp_path / "r"
    run_train(tiny_args(cache, out, steps=2))
    assert run_cli(main, tiny_args(cache, out, steps=2)) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert run_cli(main, tiny_args(cache, out, steps=2, resume=True, lr=0.5)) == 2
    assert "lr (0.01 -> 0.5)" in capsys.readouterr().err
    assert run_cli(main, tiny_args(cache, tmp_path / "nothing", resume=True)) == 2
    assert "no config.json" in capsys.readouterr().err


def test_bad_options_give_clear_errors(tmp_path, cache, capsys):
    from userllm.llm import DefaultLLMConfig, build_default_llm

    assert run_cli(main, ["--task", "nexttitem"]) == 2
    assert "--task: 'nexttitem' is not one of" in capsys.readouterr().err
    missing = tmp_path / "missing.safetensors"
    assert run_cli(main, tiny_args(cache, tmp_path / "o1", encoder_checkpoint=missing)) == 2
    assert f"--encoder-checkpoint {missing}: file not found" in capsys.readouterr().err
    llm_dir = tmp_path / "llm_without_tokenizer"
    build_default_llm(64, DefaultLLMConfig(hidden_size=32, intermediate_size=64)).save_pretrained(llm_dir)
    assert run_cli(main, tiny_args(cache, tmp_path / "o2", llm=llm_dir)) == 2
    assert f"--llm {llm_dir}: the directory has no tokenizer" in capsys.readouterr().err
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()  # failed before any work


def test_cli_exit_status_without_traceback():
    proc = subprocess.run([sys.executable, "-m", "userllm.train", "--task", "bogus"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: --task: 'bogus'") and "Traceback" not in proc.stderr


def test_pretrained_encoder_checkpoint_is_used(tmp_path, cache):
    from userllm.encoders import load_encoder

    first = tmp_path / "first"
    run_train(tiny_args(cache, first, pretrain_steps=2, steps=1))
    enc_path = first / "pretrain" / "encoder.safetensors"
    assert enc_path.is_file()
    second = tmp_path / "second"
    run_train(tiny_args(cache, second, encoder_checkpoint=enc_path, steps=1, strategy="proj", lr=0.0))
    # strategy proj + lr 0: the encoder in the checkpoint is exactly the pretrained one
    from userllm.checkpoint import read_checkpoint

    tensors, _ = read_checkpoint(second / "checkpoints" / "step_00000001.safetensors")
    for k, v in load_encoder(enc_path).state_dict().items():
        assert torch.equal(tensors[f"model/encoder/{k}"], v), k
    assert not (second / "pretrain").exists()


def test_fused_kernels_flag_reports_its_path_and_profile(tmp_path, cache, capsys):
    from userllm.kernels import get_backend, use_backend

    with use_backend(None):
        run_train(tiny_args(cache, tmp_path / "fk", steps=3, fused_kernels=True, profile=True))
        chosen = get_backend()
    out = capsys.readouterr().out
    assert sum(line.startswith("kernels:") for line in out.splitlines()) == 1
    assert ("native C++" in out and chosen == "native") or ("not built" in out and chosen == "reference")
    prof = json.loads((tmp_path / "fk" / "profile.json").read_text())
    assert prof["run"]["kernels"] is True
    timing = prof["train_step"]["timing"]  # the first (FLOP-counted) step is not timed
    assert timing["repeats"] == 2 and timing["wall_s"] > 0 and prof["train_step"]["tokens_per_s"] > 0
