"""The torch.utils.data pipeline: sampler order, resume, shards, workers."""

import itertools

import numpy as np
import pytest
import torch

from userllm.data.dataset import process_events
from userllm.data.examples import PretrainWindows, collate, make_examples
from userllm.data.loader import EpochBatchSampler, WindowDataset, make_loader
from userllm.data.synthetic import SyntheticConfig, generate_synthetic


@pytest.fixture(scope="module")
def ds():
    cfg = SyntheticConfig(num_users=60, num_items=90, num_categories=5, min_events=6, max_events=40, seed=3)
    return process_events(generate_synthetic(cfg))


def batches(sampler):
    return [b.tolist() for b in sampler]


def test_order_is_the_seeded_epoch_permutation():
    s = EpochBatchSampler(23, 5, seed=4, steps=12)
    assert s.batches_per_epoch == 5                      # ceil(23 / 5): the partial batch is kept
    got = batches(s)
    for step, b in enumerate(got):
        epoch, i = divmod(step, 5)
        order = np.random.default_rng([4, epoch]).permutation(23)
        assert b == order[i * 5:(i + 1) * 5].tolist()
    epoch0 = sorted(itertools.chain(*got[:5]))
    assert epoch0 == list(range(23))                     # an epoch visits every window once
    assert got[:5] != got[5:10]                          # and the next epoch reshuffles
    assert batches(EpochBatchSampler(23, 5, seed=4, steps=12)) == got             # deterministic
    assert batches(EpochBatchSampler(23, 5, seed=5, steps=12)) != got             # seed matters


def test_drop_last_and_no_shuffle():
    s = EpochBatchSampler(23, 5, drop_last=True, shuffle=False, steps=9)
    assert s.batches_per_epoch == 4
    got = batches(s)
    assert got[0] == [0, 1, 2, 3, 4] and got[3] == [15, 16, 17, 18, 19] and got[4] == [0, 1, 2, 3, 4]
    assert all(len(b) == 5 for b in got)
    assert EpochBatchSampler(3, 5, drop_last=True, steps=1).batches_per_epoch == 1   # one partial batch


@pytest.mark.parametrize("k", [0, 1, 4, 5, 7, 13])
def test_resume_from_step_k_is_the_tail(k):
    full = batches(EpochBatchSampler(23, 5, seed=1, steps=15))
    assert batches(EpochBatchSampler(23, 5, seed=1, start_step=k, steps=15)) == full[k:]
    assert len(EpochBatchSampler(23, 5, seed=1, start_step=k, steps=15)) == 15 - k


def test_resume_does_not_materialise_the_skipped_batches(monkeypatch):
    """A resume at epoch 1000 draws that epoch's permutation once, not the 1000 before it."""
    drawn = []
    real = EpochBatchSampler.epoch_order
    monkeypatch.setattr(EpochBatchSampler, "epoch_order", lambda self, e: drawn.append(e) or real(self, e))
    s = EpochBatchSampler(50, 7, seed=0, start_step=1000 * 8 + 3, steps=1000 * 8 + 6)
    assert len(batches(s)) == 3 and drawn == [1000]


@pytest.mark.parametrize("world", [2, 3])
def test_rank_shards_are_disjoint_and_cover_the_global_batch(world):
    single = batches(EpochBatchSampler(41, 6, seed=2, steps=20))
    shards = [batches(EpochBatchSampler(41, 6, seed=2, rank=r, world=world, steps=20)) for r in range(world)]
    for step, want in enumerate(single):
        parts = [shards[r][step] for r in range(world)]
        assert sorted(itertools.chain(*parts)) == sorted(want)
        assert sum(map(len, parts)) == len(want)
        assert parts[0] == want[0::world]


def test_bad_arguments(ds):
    for kwargs in (dict(n=0, batch_size=2), dict(n=5, batch_size=0), dict(n=5, batch_size=2, rank=2, world=2),
                   dict(n=5, batch_size=1, world=2), dict(n=5, batch_size=2, start_step=3, steps=2)):
        with pytest.raises(ValueError):
            EpochBatchSampler(**kwargs)
    data, sampler = WindowDataset(PretrainWindows(ds, 8)), EpochBatchSampler(10, 2, steps=1)
    for kwargs in (dict(workers=-1), dict(prefetch=0)):
        with pytest.raises(ValueError):
            make_loader(data, sampler, **kwargs)


def assert_same_batch(a, b):
    for x, y in zip(a.features + a.target + [a.lengths, a.labels, a.rows, a.users],
                    b.features + b.target + [b.lengths, b.labels, b.rows, b.users]):
        assert torch.equal(x, y)
    assert a.texts == b.texts


def test_dataset_items_are_collated_batches(ds):
    windows = PretrainWindows(ds, 8, "train", stride=3)
    idx = np.array([5, 0, 17])
    assert_same_batch(WindowDataset(windows)[idx], windows.batch(idx))
    ex = make_examples(ds, "nextitem", 8, "train")
    assert_same_batch(WindowDataset(ex, ds)[idx], collate(ds, ex, idx))
    with pytest.raises(ValueError):
        WindowDataset(ex)


@pytest.mark.parametrize("world", [1, 2])
def test_workers_give_the_same_batches_as_the_main_process(ds, world):
    windows = PretrainWindows(ds, 8, "train", stride=2)
    for rank in range(world):
        def loader(workers):
            sampler = EpochBatchSampler(len(windows), 16, seed=9, rank=rank, world=world, start_step=3, steps=12)
            return list(make_loader(WindowDataset(windows), sampler, workers=workers))
        inline, parallel = loader(0), loader(2)
        assert len(inline) == len(parallel) == 9
        for a, b in zip(inline, parallel):
            assert_same_batch(a, b)


def test_transform_runs_on_each_batch(ds):
    ex = make_examples(ds, "nextitem", 8, "train")
    sampler = EpochBatchSampler(len(ex), 10, seed=0, steps=4)
    got = list(make_loader(WindowDataset(ex, ds, transform=len), sampler, workers=1))
    assert got == [10, 10, 10, 10]


def test_pretrain_windows_subset(ds):
    windows = PretrainWindows(ds, 8, "train", stride=2)
    idx = np.array([7, 2, 30])
    sub = windows.subset(idx)
    assert len(sub) == 3 and sub.window == 8 and sub.ds is ds
    assert_same_batch(sub.batch(np.arange(3)), windows.batch(idx))
    assert len(windows) > 3                                     # the original is untouched


def test_pretraining_losses_do_not_depend_on_the_workers(ds):
    from userllm.config import PretrainConfig
    from userllm.encoders.pretraining import pretrain_encoder
    from userllm.loop import seed_everything

    def run(workers):
        seed_everything(0)
        cfg = PretrainConfig(window=8, steps=5, batch_size=16, d_model=16, layers=1, warmup=1, log_every=1,
                             workers=workers)
        encoder, stats = pretrain_encoder(ds, cfg, torch.device("cpu"))
        return stats["final_loss"], [p.detach().clone() for p in encoder.parameters()]

    (loss0, params0), (loss2, params2) = run(0), run(2)
    assert loss0 == loss2 and all(torch.equal(a, b) for a, b in zip(params0, params2))
