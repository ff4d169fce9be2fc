"""Serving many adapters off one base model."""

from .engine import AdapterSpec, Completion, MultiAdapterModel

__all__ = ["AdapterSpec", "Completion", "MultiAdapterModel"]
