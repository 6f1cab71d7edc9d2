"""Patching: activation patching (:mod:`ioi.patching.activation`) and, later, path patching."""

from ioi.patching.activation import *  # noqa: F401,F403
from ioi.patching.activation import __all__ as _activation_all

__all__ = [*_activation_all]
