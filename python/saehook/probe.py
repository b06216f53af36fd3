"""Public name of saehook.workflows.probe: the same module object under both names, so that attributes set
on one (monkeypatching included) are seen through the other."""
import sys

from .workflows import probe as _module

sys.modules[__name__] = _module
