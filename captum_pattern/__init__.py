"""captum-pattern: PatternNet and PatternAttribution for PyTorch, as Captum methods.

>>> import torch
>>> from captum_pattern import PatternAttribution, PatternFitter
>>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
>>> patterns = PatternFitter(model).fit([torch.randn(128, 4)])
>>> PatternAttribution(model, patterns).attribute(torch.randn(3, 4), target=1).shape
torch.Size([3, 4])
"""

from .attribution import (
    LayerPatternAttribution,
    LayerPatternNet,
    NeuronPatternAttribution,
    NeuronPatternNet,
    PatternAttribution,
    PatternNet,
)
from .errors import (
    InvalidDataError,
    InvalidInputError,
    ModelChangedError,
    PatternError,
    PatternFileError,
    PatternMismatchError,
    UnsupportedModelError,
)
from .fitter import PatternFitter
from .patterns import LayerPatterns, Patterns

__version__ = "0.1.0"

__all__ = [
    "InvalidDataError",
    "InvalidInputError",
    "LayerPatternAttribution",
    "LayerPatternNet",
    "LayerPatterns",
    "ModelChangedError",
    "NeuronPatternAttribution",
    "NeuronPatternNet",
    "PatternAttribution",
    "PatternError",
    "PatternFileError",
    "PatternFitter",
    "PatternMismatchError",
    "PatternNet",
    "Patterns",
    "UnsupportedModelError",
    "__version__",
]
