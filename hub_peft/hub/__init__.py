"""The local Hub (server, storage) and helpers to start one and to talk to any Hub."""

from .process import LocalHubProcess, start_local_hub

__all__ = ["LocalHubProcess", "start_local_hub"]
