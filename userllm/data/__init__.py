"""Data: readers for MovieLens / Amazon Review 2018 / Google Local, a synthetic generator, vocabularies,
per-user sequences, task examples with the leave-last-out split, and the on-disk cache."""

from .events import EventTable, ItemCatalog

__all__ = ["EventTable", "ItemCatalog"]
