"""Public name of saehook.engines.hf: the same module object under both names, so that attributes set
on one (monkeypatching included) are seen through the other."""
import sys

from .engines import hf as _module

sys.modules[__name__] = _module
