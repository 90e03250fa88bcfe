"""What the package knows about ``nn.Linear`` and ``nn.Conv1d/2d/3d``.

Two operations, both without ever building a tensor of patches:

* :meth:`LayerGeometry.patch_sums` — ``Σ_samples patch(x) ⊗ f`` for a stack of
  per-neuron signals ``f``: the weight gradient of the layer with ``f`` as the
  output gradient (one GEMM of the forward's size per signal; see
  ``docs/method.md``).
* :meth:`LayerGeometry.input_vjp` — the layer's transposed application with a
  substituted weight: the backward pass of PatternNet / PatternAttribution.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "KERNELS",
    "LINEAR_TYPES",
    "LayerGeometry",
    "is_explained_layer",
    "layer_types",
    "register_layer",
]

#: Output positions per weight gradient in :meth:`LayerGeometry.patch_sums` on the CPU
#: (whole images; one at least).  oneDNN adds a weight gradient's positions one after the
#: other in float32, so the rounding error of its sums grows with their number: patterns
#: of the first layers off by up to 2e-3 (relative, against a float64 fit) over batches of
#: 32 images at 224 px (1.6 M positions per call), 1e-5 in pieces (``docs/performance.md``).
SUM_POSITIONS = 1 << 16

#: The ways :meth:`LayerGeometry.patch_sums` can compute a layer's sums.
KERNELS: tuple[str, ...] = ("weight_grad", "weight_grad_cl", "unfold")

GeometryReader = Callable[[nn.Module], "LayerGeometry"]

# the one registry of explained layer types: type -> how its geometry is read
_LAYER_TYPES: dict[type[nn.Module], GeometryReader] = {}


def register_layer(layer_type: type[nn.Module], reader: GeometryReader) -> None:
    """Explain every ``layer_type`` module, reading its geometry with ``reader``.

    The fitter, the backward pass, ρ and fold discovery all ask this registry
    which modules get a pattern; a new layer type whose forward is a
    convolution or an affine map is this one call.

    >>> class MyLinear(nn.Linear):
    ...     pass
    >>> register_layer(MyLinear, LayerGeometry.of_linear)  # subclasses match anyway
    >>> is_explained_layer(MyLinear(2, 3))
    True
    """
    _LAYER_TYPES[layer_type] = reader


def layer_types() -> tuple[type[nn.Module], ...]:
    """The registered layer types (``nn.Linear`` and ``nn.Conv1d/2d/3d`` built in)."""
    return tuple(_LAYER_TYPES)


def _reader(module: nn.Module) -> GeometryReader | None:
    for cls in type(module).__mro__:
        if cls in _LAYER_TYPES:
            return _LAYER_TYPES[cls]
    return None


def layer_weight(module: nn.Module) -> Tensor:
    """The weight parameter of an explained layer (typed: ``module.weight`` is not)."""
    weight = module.weight
    if not isinstance(weight, Tensor):
        raise TypeError(f"{type(module).__name__} has no weight tensor")
    return weight


def layer_bias(module: nn.Module) -> Tensor | None:
    """The bias of an explained layer, or ``None``."""
    bias = getattr(module, "bias", None)
    return bias if isinstance(bias, Tensor) else None


def is_explained_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a layer that gets a pattern (a registered layer type)."""
    return _reader(module) is not None


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
        """The geometry of a registered layer (see :func:`register_layer`)."""
        reader = _reader(module)
        if reader is None:
            names = ", ".join(t.__name__ for t in _LAYER_TYPES)
            raise TypeError(f"{type(module).__name__} is not an explained layer type ({names})")
        return reader(module)

    @classmethod
    def of_linear(cls, module: nn.Module) -> LayerGeometry:
        """A linear layer: no spatial dimensions, one group."""
        return cls(tuple(layer_weight(module).shape), 1, (), (), (), "zeros")

    @classmethod
    def of_conv(cls, module: nn.Module) -> LayerGeometry:
        """A ``ConvNd``: stride, dilation, groups and padding as the module has them."""
        assert isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d))
        return cls(
            weight_shape=tuple(module.weight.shape),
            groups=module.groups,
            stride=tuple(module.stride),
            dilation=tuple(module.dilation),
            pad=_conv_pad_spec(module),
            padding_mode=module.padding_mode,
        )

    @property
    def spatial_dims(self) -> int:
        return len(self.stride)

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

    def padded(self, x: Tensor) -> Tensor:
        """``x`` with the layer's padding applied (any mode), as the layer sees it."""
        if not any(self.pad):
            return x
        mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
        return F.pad(x, self.pad, mode=mode)

    def _explicit_pad(self, x: Tensor) -> Tensor:
        """The padding the GEMMs cannot apply themselves (see :attr:`_gemm_padding`)."""
        if self.padding_mode == "zeros" and self._symmetric:
            return x
        return self.padded(x)

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
        faster on small spatial maps).  On the CPU the weight gradients run in
        pieces of whole images of at most :data:`SUM_POSITIONS` output
        positions, for accurate float32 sums.
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
        positions = signals[0, 0].numel()
        step = max(1, SUM_POSITIONS // max(1, positions) if x.device.type == "cpu" else len(x))
        total = self._weight_grad(x[:step], signals[:step], self.weight_shape[1], self.groups)
        for i in range(step, len(x), step):
            part = self._weight_grad(
                x[i : i + step], signals[i : i + step], self.weight_shape[1], self.groups
            )
            total += part
        return total

    @property
    def methods(self) -> tuple[str, ...]:
        """The ways :meth:`patch_sums` can compute this layer's sums."""
        if self.spatial_dims == 2:
            return ("weight_grad", "weight_grad_cl", "unfold")
        return ("weight_grad",)

    def kernel_for(self, input_shape: torch.Size, device: torch.device) -> str:
        """The kernel :meth:`patch_sums` uses for inputs of ``input_shape``: a fixed rule.

        The same layer, input shape and device always get the same kernel, so
        two identical fits give identical patterns.  On the CPU (oneDNN), small
        output maps (at most 16 positions) are faster as chunked unfold +
        matmul, and wide maps with few input channels per group in channels-last
        layout; everything else, and every accelerator, uses the weight gradient.

        >>> geo = LayerGeometry.from_module(torch.nn.Conv2d(3, 8, 3, padding=1))
        >>> geo.kernel_for(torch.Size([16, 3, 64, 64]), torch.device("cpu"))
        'weight_grad_cl'
        >>> geo.kernel_for(torch.Size([16, 3, 4, 4]), torch.device("cpu"))
        'unfold'
        """
        if self.spatial_dims != 2 or device.type != "cpu":
            return "weight_grad"
        positions = 1
        for i, size in enumerate(input_shape[2:]):
            back = 2 * (self.spatial_dims - 1 - i)  # F.pad specs start at the last dimension
            span = size + self.pad[back] + self.pad[back + 1]
            reach = self.dilation[i] * (self.weight_shape[2 + i] - 1) + 1
            positions *= (span - reach) // self.stride[i] + 1
        if positions <= 16:
            return "unfold"
        if self.weight_shape[1] <= 64 and positions >= 1024:
            return "weight_grad_cl"
        return "weight_grad"

    def _unfold_sums(self, x: Tensor, signals: Tensor, chunk_bytes: int = 2**26) -> Tensor:
        if self.spatial_dims != 2:
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
                padding=tuple(self._gemm_padding),
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


register_layer(nn.Linear, LayerGeometry.of_linear)
for _conv in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
    register_layer(_conv, LayerGeometry.of_conv)

# the built-in explained layer types (the registry may hold more)
LINEAR_TYPES: tuple[type[nn.Module], ...] = layer_types()
