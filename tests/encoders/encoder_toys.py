"""What the encoder tests share: toy features (an item id and a multi-valued category) and a short fit."""

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


def fit_briefly(enc, feats, lengths, optimizer=torch.optim.AdamW, steps=40, lr=1e-2):
    """Train ``enc`` on one batch with its own ``next_event_loss``; returns (first loss, last loss)."""
    opt = optimizer(enc.parameters(), lr=lr)
    first = None
    for _ in range(steps):
        loss, _ = enc.next_event_loss(feats, lengths)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    return first, loss.item()
