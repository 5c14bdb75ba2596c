"""The errors the vocabulary raises, and the base the store's errors share.

``StoreError`` is defined here, not in the store, because the vocabulary raises it too (a
connection whose credentials variable is unset, a merge strategy nobody knows): callers catch one
family, whichever layer found the problem, and ``core`` imports nothing of the store.
"""

from __future__ import annotations


class StoreError(Exception):
    """Base class for every error the records store (and the vocabulary it stores) raises on purpose."""


class InvalidBatchError(StoreError, ValueError):
    """A batch the store refuses as a whole: nothing of it is written."""
