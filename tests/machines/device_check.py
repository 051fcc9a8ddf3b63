"""A torch function mode that records tensor factories called without a device.

The machines must make every tensor on their images' device: a factory call without
``device=`` (``torch.zeros(n)``) makes a CPU tensor, which on a GPU machine either fails at
the next operation or silently moves work to the CPU.  Without a GPU this is how the CPU
test suite finds such calls: run the machines under this mode and list the call sites in
the package that it caught.
"""

import sys

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._device import _device_constructors


class FactoriesWithoutDevice(TorchFunctionMode):
    """Records ``file:line factory`` for every tensor factory called from ``package``'s
    code without an explicit device (``as_tensor``/``tensor`` of a tensor keep its device and
    are not counted)."""

    def __init__(self, package: str = "els_audit/machines/"):
        super().__init__()
        self.package = package
        self.sites: set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _device_constructors() and kwargs.get("device") is None and not (
                args and isinstance(args[0], torch.Tensor)):
            frame = sys._getframe(1)
            while frame is not None and self.package not in frame.f_code.co_filename:
                frame = frame.f_back
            if frame is not None:
                where = frame.f_code.co_filename.split(self.package)[-1]
                self.sites.add(f"{where}:{frame.f_lineno} {func.__name__}")
        return func(*args, **kwargs)
