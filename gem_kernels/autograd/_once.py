"""One backward per forward for the Functions that compute their gradient in the forward.

Such a Function hands its gradient buffer to autograd without a copy (and may scale it in place), so
a second backward through the same graph would see a gradient already used: it raises instead.
"""

from __future__ import annotations

CONSUMED = object()


def take_once(ctx, name: str, message: str):
    """``getattr(ctx, name)``, replaced by a marker so that the next call raises RuntimeError(message).
    Dropping the reference also lets autograd keep the buffer as ``.grad`` without a copy."""
    value = getattr(ctx, name)
    if value is CONSUMED:
        raise RuntimeError(message)
    setattr(ctx, name, CONSUMED)
    return value
