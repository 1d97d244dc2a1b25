"""``-h`` of every command: each option has a help text, and says its default once (booleans on/off)."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def parsers() -> dict[str, argparse.ArgumentParser]:
    from userllm import evaluate, generate
    from userllm.config import PretrainConfig, TrainConfig, build_parser
    from userllm.profiling import compare

    return {"train": build_parser(TrainConfig), "pretrain": build_parser(PretrainConfig),
            "evaluate": evaluate.build_parser(), "generate": generate.build_parser(),
            "compare": compare.build_parser()}


@pytest.mark.parametrize("name", ["train", "pretrain", "evaluate", "generate", "compare"])
def test_every_option_has_help_and_one_default(name):
    parser = parsers()[name]
    formatter = parser._get_formatter()
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        text = formatter._expand_help(action) if action.help else ""
        flag = (action.option_strings or [action.dest])[0]
        assert text.strip(), f"{name} {flag}: no help"
        assert text.count("(default") <= 1, f"{name} {flag}: {text!r}"
        if isinstance(action, (argparse.BooleanOptionalAction, argparse._StoreTrueAction)):
            assert "(default: on)" in text or "(default: off)" in text, f"{name} {flag}: {text!r}"


def test_train_help_prints_each_default_once():
    proc = subprocess.run([sys.executable, "-m", "userllm.train", "-h"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())
    assert "(default: None)" not in text and not re.search(r"\(default[^)]*\)\s*\(default", text)
    assert "--cosine, --no-cosine cosine decay" in text and "(else constant) (default: on)" in text
    assert "--resume, --no-resume continue the run in --out from its latest checkpoint (default: off)" in text
