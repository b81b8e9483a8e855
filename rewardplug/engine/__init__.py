"""The in-process engine: many callers submit samples, background threads batch them by token budget,
share work across a prompt group (vision once per image, prompt prefix once) and resolve futures.

Imports only the layers below it (inputs, encoding, model); never serving or integrations.
"""

from .engine import RewardEngine

__all__ = ["RewardEngine"]
