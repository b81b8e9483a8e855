"""``on_invalid`` for the adapters: the core's one parser and vocabulary (``rewardplug.on_invalid``),
re-exported here so every adapter, and existing imports, keep these names."""

from ..on_invalid import DEFAULT, NONE, RAISE, WORDS, parse_on_invalid, raise_hint

__all__ = ["DEFAULT", "NONE", "RAISE", "WORDS", "parse_on_invalid", "raise_hint"]
