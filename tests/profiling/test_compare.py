"""`python -m userllm.profiling.compare` end to end on CPU with tiny models, and the report from run dirs."""

from __future__ import annotations

import json

import pytest
import torch

from userllm.profiling import compare, report
from userllm.profiling.flops import (PassShape, analytic_generation, analytic_userllm, count_flops,
                                     model_components)


@pytest.fixture(scope="module")
def compare_dir(tmp_path_factory):
    import os

    out = tmp_path_factory.mktemp("compare")
    old = os.environ.get("USERLLM_CACHE")
    os.environ["USERLLM_CACHE"] = str(out / "cache")           # the tokenizer cache stays inside the test
    try:
        code = compare.main(["--tiny", "--lengths", "4", "8", "--steps", "1", "--new-tokens", "3",
                             "--batch-size", "2", "--perceiver-latents", "4", "--out", str(out), "--device", "cpu"])
    finally:
        if old is None:
            os.environ.pop("USERLLM_CACHE", None)
        else:
            os.environ["USERLLM_CACHE"] = old
    assert code == 0
    return out


@pytest.mark.slow
def test_compare_writes_markdown_json_and_pngs(compare_dir):
    for name in ("report.md", "report.json", "tokens.png", "flops.png", "time.png", "memory.png"):
        path = compare_dir / name
        assert path.is_file() and path.stat().st_size > 0, name
    # energy.png only when energy was measured (two empty panels otherwise): the report says "no GPU"
    measured = [s[k] for r in json.loads((compare_dir / "report.json").read_text())["runs"] for s in [r]
                for k in ("train_energy_j", "inference_energy_j") if s[k] is not None]
    assert (compare_dir / "energy.png").is_file() == bool(measured)
    assert (compare_dir / "tokens.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (compare_dir / "report.md").read_text()
    assert "Table 3" in md and "| 4 |" in md and "| 8 |" in md
    data = json.loads((compare_dir / "report.json").read_text())
    rows = {r["history_length"]: r for r in data["rows"]}
    assert set(rows) == {4, 8}
    for L, r in rows.items():
        ul, tp = r["userllm"], r["textprompt"]
        # cross-attention: the prompt does not grow with the history; the text prompt does
        assert ul["tokens"] < tp["tokens"]
        # measured FLOPs equal the analytic model exactly on these shapes
        for s in (ul, tp):
            assert s["train_measured_total"] == s["train_analytic_total"]
            assert s["inference_measured_total"] == s["inference_analytic_total"]
        assert r["reduction_inference_measured_llm"] > 1
        assert set(ul["train_components"]) >= {"llm", "encoder", "projection", "perceiver", "cross_attention"}
        assert set(tp["train_components"]) == {"llm"}
    assert rows[4]["userllm"]["tokens"] == rows[8]["userllm"]["tokens"]
    assert rows[8]["textprompt"]["tokens"] > rows[4]["textprompt"]["tokens"]
    assert rows[8]["token_ratio"] > rows[4]["token_ratio"]
    # no NVIDIA GPU here: energy is stated as unavailable, time is still measured
    if not torch.cuda.is_available():
        assert ul["train_energy_j"] is None and "no NVIDIA GPU" in md
    assert ul["train_step_s"] > 0 and ul["prefill_s"] > 0
    # throughput in examples/s and generated tokens/s, not LLM input tokens/s; medians with their spread
    assert "examples/s" in md and "generated tokens/s" in md and "| tokens/s |" not in md
    B = ul["batch"]
    assert ul["train_examples_per_s"] == pytest.approx(B / ul["train_step_s"])
    assert ul["generated_tokens_per_s"] == pytest.approx(B * ul["new_tokens"] / ul["generate_s"])
    sp = ul["train_step_spread"]
    assert sp["min"] <= sp["median"] <= sp["max"] and sp["repeats"] >= 1
    # --steps 1: every timing is a single repeat, and the report says so beside the speed-ups
    assert sp["repeats"] == 1 and "(1 repeat)" in md and "⚠ from a single repeat" in md


@pytest.mark.slow
def test_profiles_and_report_cli(compare_dir, tmp_path):
    prof = json.loads((compare_dir / "runs" / "userllm_L8" / "profile.json").read_text())
    assert prof["schema"] == compare.SCHEMA and prof["run"]["method"] == "userllm"
    assert prof["tokens"]["per_example"][0]["prefix"] == 0          # cross-attention adds no context tokens
    assert prof["inference"]["new_tokens"] == 3
    assert report.main([str(compare_dir / "runs"), "--out", str(tmp_path)]) == 0
    assert (tmp_path / "report.md").is_file() and (tmp_path / "flops.png").is_file()
    from userllm.errors import UserError

    with pytest.raises(UserError, match="no such run directory"):
        report.build_report([tmp_path / "missing"], tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no profile.json"):
        report.build_report([tmp_path / "empty"], tmp_path)


def test_write_profile_merges_sections(tmp_path):
    compare.write_profile(tmp_path, run={"method": "userllm", "history_length": 50}, train_step={"x": 1})
    compare.write_profile(tmp_path, inference={"y": 2})
    data = json.loads((tmp_path / "profile.json").read_text())
    assert data["train_step"] == {"x": 1} and data["inference"] == {"y": 2} and data["run"]["history_length"] == 50


def test_profile_training_step_counts_one_step_and_times_the_rest():
    from userllm.integration import UserLLM, UserLLMConfig
    from userllm.integration.testing import tiny_llm, toy_features, ToyEncoder

    torch.manual_seed(0)
    model = UserLLM(tiny_llm("llama", hidden=16, layers=1, heads=2, kv_heads=1), ToyEncoder([20, 5], 8),
                    UserLLMConfig(integration="softprompt", perceiver_latents=2, task_prompt_len=2))
    feats, lens = toy_features([3, 3], 3)
    ids = torch.randint(3, 96, (2, 4))
    calls = []

    def step():
        calls.append(1)
        model(input_ids=ids, features=feats, lengths=lens, labels=ids).loss.backward()

    a = analytic_userllm(model, PassShape(2, 4, 3), phase="train", head_from=0)     # labels from column 0
    sec = compare.profile_training_step(step, model, steps=2, tokens_per_step=8, analytic=a)
    assert len(calls) == 3
    meas = sec["flops"]["measured"]
    assert meas["total"] > 0 and sec["flops"]["analytic"]["total"] == a.total
    # the toy encoder's Linear is counted as "encoder"; everything the analytic model covers matches
    for comp in ("llm", "projection", "perceiver"):
        assert meas["components"][comp]["total"] == a[comp], comp
    assert sec["timing"]["repeats"] == 2 and sec["tokens_per_s"] > 0


def test_generation_flops_match_analytic_per_component():
    from userllm.integration import UserLLM, UserLLMConfig
    from userllm.integration.testing import tiny_llm, toy_features, ToyEncoder

    torch.manual_seed(0)
    for integration in ("xattn", "softprompt"):
        model = UserLLM(tiny_llm("llama", hidden=16, layers=2, heads=2, kv_heads=1), ToyEncoder([20, 5], 8),
                        UserLLMConfig(integration=integration, perceiver_latents=3, task_prompt_len=2)).eval()
        feats, lens = toy_features([5, 5], 5)
        ids = torch.randint(3, 96, (2, 4))
        comps, methods = model_components(model)
        with torch.no_grad():
            _, fc = count_flops(lambda: model.generate(ids, features=feats, lengths=lens, max_new_tokens=3,
                                                       min_new_tokens=3, do_sample=False), comps, methods)
        prefill, steps = analytic_generation(model, 2, 4, 5, 3)
        total = prefill + steps[0] + steps[1]
        measured = fc.breakdown()
        for comp in ("llm", "projection", "perceiver", "cross_attention"):
            assert measured[comp] == total[comp], (integration, comp)


@pytest.mark.parametrize("argv, message", [
    (["--llm", "x", "--llm-hidden", "256"], "cannot be used with --llm"),
    (["--llm-hidden", "544"], "multiple of 32 \\(of 64 from 512\\)"),
    (["--llm-layers", "0"], "--llm-layers: must be positive"),
])
def test_llm_size_options_are_checked_before_any_work(tmp_path, argv, message):
    from userllm.errors import UserError

    with pytest.raises(UserError, match=message):
        compare.main([*argv, "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def _pointer_model():
    """An AR encoder (2 layers: the last one cut to the last event in ``score_next``) feeding a readout of 3
    candidates x 4 title tokens with the pointer head."""
    from userllm.data.dataset import FeatureSpec
    from userllm.encoders import AutoregressiveEncoder, EncoderConfig
    from userllm.integration import UserLLM, UserLLMConfig
    from userllm.integration.readout import title_token_ids, title_vectors
    from userllm.integration.testing import open_gates, tiny_llm

    torch.manual_seed(0)
    specs = [FeatureSpec("item", 12, False), FeatureSpec("rating", 6, False)]
    enc = AutoregressiveEncoder(EncoderConfig(specs, feature_dims=[8, 4], d_model=16, n_layers=2, n_heads=2,
                                              dropout=0.0, max_len=16)).eval()
    llm = tiny_llm("llama", vocab_size=50, hidden=32, layers=2)
    model = UserLLM(llm, enc, UserLLMConfig(readout_tokens=3, readout_title_tokens=4, readout_pointer=True)).eval()
    open_gates(model, 0.5)
    titles = [[]] + [[3 + i, 20 + i % 4] + [30 + i] * (i % 3) for i in range(11)]
    model.readout.set_title_vectors(title_vectors(llm, titles, 4))
    model.readout.set_title_ids(title_token_ids(titles, 4, 2))
    g = torch.Generator().manual_seed(2)
    lens = torch.tensor([5, 1, 3])
    pad = torch.arange(5)[None] >= lens[:, None]
    feats = [torch.randint(1, 12, (3, 5), generator=g).masked_fill(pad, -1),
             torch.randint(1, 6, (3, 5), generator=g).masked_fill(pad, -1)]
    return model, feats, lens


def test_readout_and_pointer_flops_match_analytic_in_training_and_generation():
    """The readout's tokens join the cross-attention's keys, and its scoring, adapters and pointer head are
    counted as ``readout``: measured equals analytic per component, training step and generation alike."""
    model, feats, lens = _pointer_model()
    ids = torch.randint(3, 50, (3, 4))
    comps, methods = model_components(model)
    assert "readout" in comps and "readout" in methods

    def step():
        model.zero_grad()
        model(input_ids=ids, features=feats, lengths=lens, labels=ids).loss.backward()

    _, fc = count_flops(step, comps, methods)
    a = analytic_userllm(model, PassShape(3, 4, 5), phase="train", head_from=0)
    measured = fc.breakdown()
    for comp in ("llm", "encoder", "projection", "readout", "cross_attention"):
        assert measured[comp] == a[comp], (comp, measured[comp], a[comp])
    assert a["readout"] > 0

    with torch.no_grad():
        _, fc = count_flops(lambda: model.generate(ids, features=feats, lengths=lens, max_new_tokens=3,
                                                   min_new_tokens=3, do_sample=False), comps, methods)
    prefill, steps = analytic_generation(model, 3, 4, 5, 3)
    total = prefill + steps[0] + steps[1]
    measured = fc.breakdown()
    for comp in ("llm", "encoder", "projection", "readout", "cross_attention"):
        assert measured[comp] == total[comp], (comp, measured[comp], total[comp])
