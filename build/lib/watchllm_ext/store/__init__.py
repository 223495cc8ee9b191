"""The store interface and what core does with any store (migrations, row building)."""

from .base import Store, StoreError, StoreLockedError
from .migrations import apply_migrations, load_migrations

__all__ = ["Store", "StoreError", "StoreLockedError", "apply_migrations", "load_migrations"]
