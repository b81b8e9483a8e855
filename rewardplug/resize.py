"""Kept so ``rewardplug.resize`` stays importable: the module lives in ``rewardplug.encoding.resize``."""

from .encoding.resize import PRECISION_BITS, coefficients, pillow_rule, resize_bicubic

__all__ = ["PRECISION_BITS", "coefficients", "pillow_rule", "resize_bicubic"]
