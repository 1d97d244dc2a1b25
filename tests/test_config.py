"""TrainConfig: CLI generated from the dataclass, config files, precedence, and errors naming the key."""

from __future__ import annotations

import json
from dataclasses import fields

import pytest

from userllm.config import TrainConfig, build_parser, parse_config
from userllm.errors import UserError


def test_every_field_has_a_flag_with_help():
    parser = build_parser()
    actions = {a.dest: a for a in parser._actions}
    for f in fields(TrainConfig):
        assert f.name in actions, f.name
        assert actions[f.name].help, f.name
    assert "--fused-kernels" in parser.format_help() and "--perceiver-latents" in parser.format_help()


def test_defaults_and_cli_types():
    cfg = parse_config([])
    assert cfg == TrainConfig()
    cfg = parse_config(["--steps", "7", "--lr", "1e-4", "--no-cosine", "--fused-kernels", "--task", "favgenre",
                        "--llm", "/some/dir", "--perceiver-latents", "4"])
    assert (cfg.steps, cfg.lr, cfg.cosine, cfg.fused_kernels, cfg.task, cfg.llm, cfg.perceiver_latents) == \
        (7, 1e-4, False, True, "favgenre", "/some/dir", 4)


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_file_then_cli_override(tmp_path, suffix):
    data = {"steps": 11, "batch-size": 4, "strategy": "full", "cosine": False}
    path = tmp_path / f"cfg{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(data))
    else:
        path.write_text("steps: 11\nbatch-size: 4\nstrategy: full\ncosine: false\n")
    cfg = parse_config(["--config", str(path), "--steps", "3"])
    assert cfg.steps == 3            # the command line wins
    assert cfg.batch_size == 4 and cfg.strategy == "full" and cfg.cosine is False


def test_round_trip_through_dict():
    cfg = parse_config(["--window", "9", "--text-events", "3", "--out", "x"])
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


@pytest.mark.parametrize("argv, key", [
    (["--task", "nexitem"], "--task"),
    (["--steps", "ten"], "--steps"),
    (["--steps", "0"], "--steps"),
    (["--lr", "nan"], "--lr"),
    (["--strategy", "enc", "--baseline", "textprompt"], "--strategy"),
    (["--text-events", "30", "--window", "10"], "--text-events"),
    (["--dataset", "movielens"], "--data-path"),
    (["--stepz", "3"], "--stepz"),
    (["--prior-weight", "1.5"], "--prior-weight"),
    (["--prior-weight", "0.5", "--baseline", "textprompt"], "--prior-weight"),
    (["--prior-weight", "0.5", "--integration", "softprompt"], "--prior-weight"),
    (["--prior-weight", "0.5", "--task", "reviewg"], "--prior-weight"),
    (["--decoder", "exact", "--prior-weight", "0.5"], "--decoder exact"),
    (["--decoder", "exact", "--task", "reviewg"], "--decoder exact"),
    (["--decoder", "greedy"], "--decoder"),
    (["--freeze-encoder", "--strategy", "proj"], "--freeze-encoder"),
    (["--freeze-encoder", "--baseline", "textprompt"], "--freeze-encoder"),
    (["--readout-pointer", "--readout-tokens", "5"], "--readout-pointer"),
    (["--readout-pointer", "--readout-tokens", "5", "--readout-title-tokens", "4", "--integration", "softprompt"],
     "--readout-pointer"),
])
def test_bad_cli_values_name_the_key(argv, key):
    with pytest.raises(UserError, match=key):
        parse_config(argv)


def test_bad_file_keys_and_values(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("stepz: 3\n")
    with pytest.raises(UserError, match="'stepz'.*did you mean 'steps'"):
        parse_config(["--config", str(p)])
    p.write_text("batch_size: [1, 2]\n")
    with pytest.raises(UserError, match="--batch-size"):
        parse_config(["--config", str(p)])
    p.write_text("- a list\n")
    with pytest.raises(UserError, match="mapping"):
        parse_config(["--config", str(p)])
    with pytest.raises(UserError, match="no such file"):
        parse_config(["--config", str(tmp_path / "missing.yaml")])
    with pytest.raises(UserError, match="unknown key 'bogus'"):
        TrainConfig.from_dict({"bogus": 1})


def test_model_name():
    assert TrainConfig().model_name == "UserLLM-xattn-full"
    assert TrainConfig(baseline="textprompt", strategy="lora").model_name == "TextPrompt-lora"
    assert TrainConfig(window=50, text_events=10, perceiver_latents=16, strategy="enc").model_name == \
        "UserLLM-xattn-enc-perceiver16-TP10"


def test_pretrain_config_has_the_same_machinery(tmp_path):
    from userllm.config import PretrainConfig

    path = tmp_path / "p.yaml"
    path.write_text("encoder: dual\nsteps: 5\nlogq-correction: false\n")
    cfg = parse_config(["--config", str(path), "--steps", "7"], PretrainConfig)
    assert (cfg.encoder, cfg.steps, cfg.logq_correction) == ("dual", 7, False)
    assert PretrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(UserError, match="--heads"):
        parse_config(["--heads", "0"], PretrainConfig)
    assert {"steps", "out", "resume", "device"} <= PretrainConfig.resumable_options()
    assert "lr" not in PretrainConfig.resumable_options() and "lr" not in TrainConfig.resumable_options()


def test_derived_configs():
    cfg = TrainConfig(encoder="dual", window=7, pretrain_steps=90, encoder_dim=32, encoder_layers=3, seed=4,
                      integration="softprompt", soft_prompt_tokens=2, perceiver_latents=3)
    p = cfg.pretrain_config("runs/x/pretrain")
    assert (p.encoder, p.window, p.steps, p.d_model, p.layers, p.seed, p.warmup, p.out) == \
        ("dual", 7, 90, 32, 3, 4, 9, "runs/x/pretrain")
    u = cfg.user_llm_config()
    assert (u.integration, u.task_prompt_len, u.perceiver_latents, u.gate_init) == ("softprompt", 2, 3, 0.1)
    # the gate-init policy: closed (Flamingo) with a pretrained --llm, slightly open on the random default
    assert TrainConfig(llm="/some/dir").gate_init == 0.0 and TrainConfig(xattn_gate_init=0.5).gate_init == 0.5


def test_config_and_pretrain_do_not_load_transformers():
    """The encoder's pretraining never needs the LLM libraries; importing them cost ~3.4 CPU-s at its start."""
    import subprocess
    import sys

    code = ("import sys, userllm.config, userllm.pretrain; "
            "print(sorted(m for m in ('transformers', 'peft') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
