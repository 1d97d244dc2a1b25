"""User encoders: :class:`AutoregressiveEncoder` ("ar"), :class:`DualEncoder` ("dual") and the peer
:class:`SASRecEncoder` ("sasrec", Kang & McAuley 2018: item ids only, for comparison).

All take ``forward(features: list[Tensor], lengths: Tensor) -> EncoderOutput(embeddings, mask)`` and
expose ``output_dim``, ``next_event_loss(features, lengths)`` and ``score_next(features, lengths)``.

An encoder file (``save_encoder``) is one safetensors file whose metadata holds the kind and the JSON
config under the key ``"userllm_encoder"``, so ``load_encoder(path)`` needs nothing else.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from userllm.errors import UserError
from userllm.utils.atomic import save_safetensors

from .autoregressive import AutoregressiveEncoder, EncoderConfig
from .dual import DualEncoder, DualEncoderConfig
from .sasrec import SASRecConfig, SASRecEncoder
from .transformer import EncoderOutput, Feature

ENCODERS = {"ar": (AutoregressiveEncoder, EncoderConfig), "dual": (DualEncoder, DualEncoderConfig),
            "sasrec": (SASRecEncoder, SASRecConfig)}
METADATA_KEY = "userllm_encoder"

__all__ = ["AutoregressiveEncoder", "DualEncoder", "SASRecEncoder", "EncoderConfig", "DualEncoderConfig",
           "SASRecConfig", "EncoderOutput",
           "Feature", "build_encoder", "save_encoder", "load_encoder", "encoder_config"]


def encoder_config(kind: str, config: Any) -> EncoderConfig:
    """Coerce ``config`` (a config object or a dict) into the config class of encoder ``kind``."""
    if kind not in ENCODERS:
        raise UserError(f"unknown encoder kind {kind!r}; choose one of {sorted(ENCODERS)}")
    cls = ENCODERS[kind][1]
    if isinstance(config, cls):
        return config
    if isinstance(config, EncoderConfig):
        config = config.to_dict()
    return cls.from_dict(dict(config))


def build_encoder(kind: str, config: Any) -> torch.nn.Module:
    """A freshly initialized encoder: ``kind`` a key of ``ENCODERS``, ``config`` a config object or dict."""
    cfg = encoder_config(kind, config)
    return ENCODERS[kind][0](cfg)


def save_encoder(encoder: torch.nn.Module, path: str | os.PathLike, extra: dict | None = None) -> None:
    """Atomically write the encoder's weights (safetensors) with its kind + config (+ ``extra``) as metadata."""
    meta = {"kind": encoder.kind, "config": encoder.config.to_dict(), "extra": extra or {}}
    save_safetensors(path, encoder.state_dict(), {METADATA_KEY: json.dumps(meta)})


def read_encoder_metadata(path: str | os.PathLike) -> dict:
    """{"kind", "config", "extra"} stored in an encoder file."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise UserError(f"{os.fspath(path)}: encoder file not found")
    try:
        with safe_open(os.fspath(path), framework="pt") as fh:
            meta = fh.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise UserError(f"{os.fspath(path)}: not a safetensors file ({exc})") from exc
    if METADATA_KEY not in meta:
        raise UserError(f"{os.fspath(path)}: not a userllm encoder file (no {METADATA_KEY!r} metadata)")
    return json.loads(meta[METADATA_KEY])


def load_encoder(path: str | os.PathLike, device: str | torch.device = "cpu") -> torch.nn.Module:
    """Rebuild the encoder saved by :func:`save_encoder` (or written by ``python -m userllm.pretrain``
    as ``<run>/encoder.safetensors``); returned in eval mode on ``device``."""
    from safetensors.torch import load_file

    meta = read_encoder_metadata(path)
    encoder = build_encoder(meta["kind"], meta["config"])
    encoder.load_state_dict(load_file(os.fspath(path)))
    return encoder.to(device).eval()
