"""Data: readers for MovieLens / Amazon Review 2018 / Google Local, a synthetic generator, vocabularies,
per-user sequences, task examples with the leave-last-out split, and the on-disk cache."""

from .dataset import FeatureSpec, ProcessedDataset, load_dataset, process_events
from .events import EventTable, ItemCatalog
from .examples import (EventBatch, Examples, NextItemEval, PretrainWindows, collate, iter_batches, make_examples,
                       next_item_eval, pretraining_batches)
from .synthetic import SyntheticConfig, generate_synthetic
from .vocab import PAD_ID, UNK_ID, Vocabulary

__all__ = [
    "EventTable", "ItemCatalog",
    "SyntheticConfig", "generate_synthetic",
    "Vocabulary", "PAD_ID", "UNK_ID",
    "FeatureSpec", "ProcessedDataset", "load_dataset", "process_events",
    "Examples", "EventBatch", "make_examples", "collate", "iter_batches",
    "PretrainWindows", "pretraining_batches", "NextItemEval", "next_item_eval",
]
