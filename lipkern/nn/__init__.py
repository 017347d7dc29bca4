"""Drop-in 1-Lipschitz layers: swap ``nn.Conv2d`` for ``lipkern.nn.AOLConv2d`` with the same arguments."""

from lipkern.nn.activations import MaxMin
from lipkern.nn.aol import AOLConv2d, AOLLinear
from lipkern.nn.cpl import CPLConv2d, CPLLinear, PlainCPLConv2d, PlainCPLLinear
from lipkern.nn.sll import PlainSLLConv2d, PlainSLLLinear, SLLConv2d, SLLLinear
from lipkern.nn.spectral import SpectralConv2d, SpectralLinear

__all__ = ["AOLConv2d", "AOLLinear", "CPLConv2d", "CPLLinear", "MaxMin", "PlainCPLConv2d", "PlainCPLLinear",
           "PlainSLLConv2d", "PlainSLLLinear", "SLLConv2d", "SLLLinear", "SpectralConv2d", "SpectralLinear"]
