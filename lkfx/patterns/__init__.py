"""Pattern language (`core`) with one matcher view per frontend (`fx`, `onnx`)."""

from lkfx.patterns.core import Match, Pattern, Rule, apply_rules, find

__all__ = ["Match", "Pattern", "Rule", "apply_rules", "find"]
