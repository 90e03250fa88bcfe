"""What replaces a layer's weight in the backward pass: one small rule object per method.

The attribution methods differ only in this tensor (Sec. 4.3 and Appendix A of
the paper): PatternNet uses the pattern ``a``, PatternAttribution ``w ⊙ a``,
and the plain gradient the weight ``w`` itself.  A new method is one new
:class:`SubstitutionRule`.

>>> import torch
>>> w, a = torch.tensor([[2.0, -1.0]]), torch.tensor([[0.5, 0.5]])
>>> [rule.substitute(w, a).tolist() for rule in (PatternRule(), PatternTimesWeightRule())]
[[[0.5, 0.5]], [[1.0, -0.5]]]
"""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor

__all__ = ["PatternRule", "PatternTimesWeightRule", "SubstitutionRule", "WeightRule"]


class SubstitutionRule:
    """Base class: :meth:`substitute` returns the tensor used in place of the weight.

    ``weight`` is the layer's (BatchNorm-folded) weight and ``pattern`` its
    fitted pattern of the chosen type, both of the weight's shape, dtype and
    device.  ``uses_weight`` says whether the result depends on the weight (it
    is then recomputed when the weight changes).
    """

    uses_weight: ClassVar[bool] = True

    def substitute(self, weight: Tensor, pattern: Tensor) -> Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class PatternRule(SubstitutionRule):
    """PatternNet: the pattern ``a`` itself (the signal direction)."""

    uses_weight = False

    def substitute(self, weight: Tensor, pattern: Tensor) -> Tensor:
        return pattern


class PatternTimesWeightRule(SubstitutionRule):
    """PatternAttribution: ``w ⊙ a`` (Deep Taylor with the learned root point)."""

    def substitute(self, weight: Tensor, pattern: Tensor) -> Tensor:
        return weight * pattern


class WeightRule(SubstitutionRule):
    """The weight itself: the ordinary gradient (a check, and a baseline)."""

    def substitute(self, weight: Tensor, pattern: Tensor) -> Tensor:
        return weight
