"""What the package knows about ``nn.Linear`` and ``nn.Conv1d/2d/3d``.

Two operations, both without ever building a tensor of patches:

* :meth:`LayerGeometry.patch_sums` — ``Σ_samples patch(x) ⊗ f`` for a stack of
  per-neuron signals ``f``: the weight gradient of the layer with ``f`` as the
  output gradient (one GEMM of the forward's size per signal; docs/method.md, "Fitting:
  one pass, no patches").
* :meth:`LayerGeometry.input_vjp` — the layer's transposed application with a
  substituted weight: the backward pass of PatternNet / PatternAttribution.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["LINEAR_TYPES", "LayerGeometry", "is_explained_layer"]

LINEAR_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def is_explained_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a layer that gets a pattern (Linear or Conv1d/2d/3d)."""
    return isinstance(module, LINEAR_TYPES)


def _conv_pad_spec(module: nn.Conv1d | nn.Conv2d | nn.Conv3d) -> tuple[int, ...]:
    """The ``F.pad`` spec (last dimension first) equivalent to the module's padding."""
    dims = len(module.kernel_size)
    if isinstance(module.padding, str):
        if module.padding == "valid":
            return (0,) * (2 * dims)
        spec: list[int] = []
        for k, d in zip(reversed(module.kernel_size), reversed(module.dilation)):
            total = d * (k - 1)
            spec += [total // 2, total - total // 2]
        return tuple(spec)
    spec = []
    for p in reversed(module.padding):
        spec += [p, p]
    return tuple(spec)


@dataclass(frozen=True)
class LayerGeometry:
    """Shape information of one explained layer.

    ``pad`` is an ``F.pad`` spec; ``padding_mode`` is the module's.  A linear
    layer is the special case with no spatial dimensions (its samples are all
    leading dimensions of the input).

    Examples
    --------
    >>> geo = LayerGeometry.from_module(torch.nn.Conv2d(3, 8, 3, padding="same"))
    >>> geo.pad, geo.spatial_dims, geo.zero_padded
    ((1, 1, 1, 1), 2, True)
    """

    weight_shape: tuple[int, ...]
    groups: int
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    pad: tuple[int, ...]
    padding_mode: str

    @classmethod
    def from_module(cls, module: nn.Module) -> LayerGeometry:
        if isinstance(module, nn.Linear):
            return cls(tuple(module.weight.shape), 1, (), (), (), "zeros")
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            return cls(
                weight_shape=tuple(module.weight.shape),
                groups=module.groups,
                stride=tuple(module.stride),
                dilation=tuple(module.dilation),
                pad=_conv_pad_spec(module),
                padding_mode=module.padding_mode,
            )
        raise TypeError(f"{type(module).__name__} is not a Linear or Conv1d/2d/3d layer")

    @property
    def spatial_dims(self) -> int:
        return len(self.stride)

    @property
    def in_channels(self) -> int:
        return self.weight_shape[1] * self.groups

    @property
    def out_channels(self) -> int:
        return self.weight_shape[0]

    # ------------------------------------------------------------------ samples
    def as_samples(self, x: Tensor, out: Tensor) -> tuple[Tensor, Tensor]:
        """Bring input and output to the channel-second layout ``(N, C, *spatial)``.

        A linear layer's leading dimensions become one sample axis.
        """
        if self.spatial_dims == 0:
            return x.reshape(-1, x.shape[-1]), out.reshape(-1, out.shape[-1])
        return x, out

    @property
    def zero_padded(self) -> bool:
        """Whether the layer pads with zeros (then patch entries can be padding)."""
        return self.padding_mode == "zeros" and any(self.pad)

    @property
    def _symmetric(self) -> bool:
        return all(self.pad[i] == self.pad[i + 1] for i in range(0, len(self.pad), 2))

    @property
    def _gemm_padding(self) -> list[int]:
        """Padding the GEMMs apply themselves (zero padding, symmetric); else 0."""
        if self.padding_mode == "zeros" and self._symmetric:
            return list(reversed(self.pad[::2]))
        return [0] * self.spatial_dims

    def _explicit_pad(self, x: Tensor) -> Tensor:
        if not any(self.pad) or (self.padding_mode == "zeros" and self._symmetric):
            return x
        if self.padding_mode == "zeros":
            return F.pad(x, self.pad)
        return F.pad(x, self.pad, mode=self.padding_mode)

    def centred_input(self, x: Tensor, x_ref: Tensor, channels_last: bool = False) -> Tensor:
        """``x − c`` per input channel, ready for :meth:`patch_sums`.

        Zero padding stays zero (so a padded entry is ``x − c·m`` with
        ``m = 0``); other padding modes pad the real values first.  With
        ``channels_last`` (4-D inputs) the result has that memory format.
        """
        view = (1, -1) + (1,) * (x.dim() - 2)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        if self.padding_mode == "zeros":
            centred = torch.sub(x, x_ref.reshape(view), out=torch.empty_like(x, memory_format=fmt))
            return self._explicit_pad(centred)
        padded = self._explicit_pad(x)
        return torch.sub(
            padded, x_ref.reshape(view), out=torch.empty_like(padded, memory_format=fmt)
        )

    def samples_per_item(self, out: Tensor) -> int:
        """Number of samples (output positions) in a channel-second output."""
        return out.numel() // out.shape[1]

    def patch_sums(self, x: Tensor, signals: Tensor, method: str = "weight_grad") -> Tensor:
        """``Σ_samples patch(x) ⊗ signals``.

        ``x`` comes from :meth:`centred_input` (or is ``(S, D)`` for a linear
        layer), ``signals`` is ``(N, K, *out_spatial)`` with ``K`` divisible by
        ``groups``; channel block ``k`` of ``signals`` pairs with input group
        ``k``.  Returns ``(K, C_in / groups, *kernel)``.

        ``method`` is one of :attr:`methods`: ``"weight_grad"`` (the
        convolution's weight gradient, no patches), ``"weight_grad_cl"`` (the
        same in channels-last memory format, Conv2d) or ``"unfold"`` (Conv2d:
        patches of a few images at a time, then one matrix product; can be
        faster on small spatial maps).
        """
        if self.spatial_dims == 0:
            return signals.T @ x
        if method not in self.methods:
            raise ValueError(f"method must be one of {self.methods}, got {method!r}")
        if method == "unfold":
            return self._unfold_sums(x, signals)
        if method == "weight_grad_cl":
            x = x.contiguous(memory_format=torch.channels_last)
            signals = signals.contiguous(memory_format=torch.channels_last)
        return self._weight_grad(x, signals, self.weight_shape[1], self.groups)

    @property
    def methods(self) -> tuple[str, ...]:
        """The ways :meth:`patch_sums` can compute this layer's sums."""
        if self.spatial_dims == 2:
            return ("weight_grad", "weight_grad_cl", "unfold")
        return ("weight_grad",)

    @property
    def can_unfold(self) -> bool:
        return self.spatial_dims == 2

    def _unfold_sums(self, x: Tensor, signals: Tensor, chunk_bytes: int = 2**26) -> Tensor:
        if not self.can_unfold:
            raise ValueError("the unfold method supports Conv2d layers only")
        n, k_total = signals.shape[:2]
        groups, per_group = self.groups, self.weight_shape[1]
        kernel = self.weight_shape[2:]
        depth = per_group * kernel[0] * kernel[1]
        positions = signals.shape[2] * signals.shape[3]
        item_bytes = x.shape[1] * kernel[0] * kernel[1] * positions * x.element_size()
        step = max(1, chunk_bytes // max(item_bytes, 1))
        total = signals.new_zeros(groups, k_total // groups, depth)
        for i in range(0, n, step):
            cols = F.unfold(
                x[i : i + step],
                kernel,
                dilation=self.dilation,
                padding=self._gemm_padding,
                stride=self.stride,
            )
            m = cols.shape[0]
            cols = cols.reshape(m, groups, depth, positions).permute(1, 0, 3, 2)
            sig = signals[i : i + step].reshape(m, groups, -1, positions).permute(1, 2, 0, 3)
            total += torch.bmm(
                sig.reshape(groups, -1, m * positions), cols.reshape(groups, m * positions, depth)
            )
        return total.reshape(k_total, per_group, *kernel)

    def mask_sums(self, signal_sums: Tensor, input_shape: torch.Size) -> Tensor:
        """``Σ_samples m ⊗ signals``, ``m`` being 1 inside the input and 0 on padding.

        ``signal_sums`` are the signals summed over the batch, ``(K, *out_spatial)``;
        ``input_shape`` is the unpadded input's shape.  Returns ``(K, 1, *kernel)``:
        one weight gradient with a single input channel and a single image.
        """
        ones = signal_sums.new_ones(1, 1, *input_shape[2:])
        return self._weight_grad(self._explicit_pad(ones), signal_sums.unsqueeze(0), 1, 1)

    def _weight_grad(self, x: Tensor, signals: Tensor, channels: int, groups: int) -> Tensor:
        shape = (signals.shape[1], channels, *self.weight_shape[2:])
        if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
            weight_like = torch.empty(
                shape, dtype=signals.dtype, device=signals.device, memory_format=torch.channels_last
            )
        else:
            weight_like = signals.new_empty(1).expand(shape)
        zeros = [0] * self.spatial_dims
        return torch.ops.aten.convolution_backward(
            signals,
            x,
            weight_like,
            None,
            list(self.stride),
            self._gemm_padding,
            list(self.dilation),
            False,
            zeros,
            groups,
            (False, True, False),
        )[1]

    # ----------------------------------------------------------------- backward
    def input_vjp(self, grad_out: Tensor, weight: Tensor, input_shape: torch.Size) -> Tensor:
        """Gradient w.r.t. the input of the layer with ``weight`` in place of its own.

        This is the transposed layer applied to ``grad_out``; it does not need
        the input's values, and costs what the layer's own backward costs.
        """
        if self.spatial_dims == 0:
            return grad_out @ weight
        d = self.spatial_dims
        if not any(self.pad) or (self.padding_mode == "zeros" and self._symmetric):
            return self._conv_input_grad(grad_out, weight, input_shape, self._gemm_padding)
        # explicit padding: gradient w.r.t. the padded input, then through the pad
        padded_shape = list(input_shape)
        for i in range(d):
            padded_shape[-1 - i] += self.pad[2 * i] + self.pad[2 * i + 1]
        grad_padded = self._conv_input_grad(grad_out, weight, torch.Size(padded_shape), [0] * d)
        if self.padding_mode == "zeros":
            index = [slice(None), slice(None)]
            for i in reversed(range(d)):
                lo, hi = self.pad[2 * i], self.pad[2 * i + 1]
                index.append(slice(lo, padded_shape[-1 - i] - hi))
            return grad_padded[tuple(index)]
        with torch.enable_grad():
            probe = grad_out.new_zeros(input_shape, requires_grad=True)
            (grad,) = torch.autograd.grad(
                F.pad(probe, self.pad, mode=self.padding_mode), probe, grad_padded
            )
        return grad

    def _conv_input_grad(
        self, grad_out: Tensor, weight: Tensor, input_shape: torch.Size, padding: list[int]
    ) -> Tensor:
        zeros = [0] * self.spatial_dims
        input_like = grad_out.new_empty(1).expand(input_shape)
        return torch.ops.aten.convolution_backward(
            grad_out,
            input_like,
            weight,
            None,
            list(self.stride),
            padding,
            list(self.dilation),
            False,
            zeros,
            self.groups,
            (True, False, False),
        )[0]
