"""The toy features both the dual-encoder and SASRec tests read: an item id and a multi-valued category."""

import torch

SPECS = [dict(name="item", num_embeddings=30, multi_valued=False),
         dict(name="category", num_embeddings=7, multi_valued=True)]


def make_batch(lengths=(6, 3, 2, 5), L=6, seed=1):
    """([item int64 [B, L], category int64 [B, L, 2]], lengths int64 [B]); padding = -1."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(lengths)
    pad = torch.arange(L)[None] >= lengths[:, None]
    item = torch.randint(1, 30, (len(lengths), L), generator=g).masked_fill(pad, -1)
    cat = torch.randint(1, 7, (len(lengths), L, 2), generator=g).masked_fill(pad[..., None], -1)
    return [item, cat], lengths
