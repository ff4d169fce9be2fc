"""Serving many adapters off one base model."""

from .engine import AdapterSpec, MultiAdapterModel

__all__ = ["AdapterSpec", "MultiAdapterModel"]
