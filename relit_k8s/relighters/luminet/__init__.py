"""``luminet``: the official LumiNet checkpoint (a ControlNet on Stable Diffusion 2.1 with
lighting tokens), reimplemented from the facts of the original code and proven equal to it on
a golden fixture made by that code (``tests/test_luminet.py``)."""

from .relighter import LuminetOptions, LuminetRelighter

__all__ = ["LuminetOptions", "LuminetRelighter"]
