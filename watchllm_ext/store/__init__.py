"""The store interface and what core does with any store (migrations, row building)."""

from .base import Store, StoreError, StoreLockedError, StoreUnavailable
from .migrations import apply_migrations, load_migrations

__all__ = [
    "Store",
    "StoreError",
    "StoreLockedError",
    "StoreUnavailable",
    "apply_migrations",
    "load_migrations",
]
