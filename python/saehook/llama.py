"""Public name of saehook.engines.llama: the same module object under both names, so that attributes set
on one (monkeypatching included) are seen through the other."""
import sys

from .engines import llama as _module

sys.modules[__name__] = _module
