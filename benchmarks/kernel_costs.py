"""What one statistic costs per VGG-16 layer, for each kernel of ``LayerGeometry.patch_sums``.

Prints, per layer of the VGG-16 layout at 64 px, the time of the stacked
weight gradient (``3·O + 1`` signal channels, as in a fit of all three pattern
types) per statistic, in units of the layer's own forward convolution, for
the plain weight gradient, the same in channels-last layout and chunked
unfold + matmul, with the batch each layer sees in a fit (16 images; 64
buffered for the 8 px maps, 192 for the 4 px maps)::

    python benchmarks/kernel_costs.py            # about a minute on 2 cores
    python benchmarks/kernel_costs.py --scale 8  # 1/8 width, 16 px: seconds

Each kernel's result is checked against the plain weight gradient.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from captum_pattern.layers import LayerGeometry

# (in channels, out channels, map size) of the VGG-16 layout at 64 px
VGG16_64 = [
    (3, 64, 64),
    (64, 64, 64),
    (64, 128, 32),
    (128, 128, 32),
    (128, 256, 16),
    (256, 256, 16),
    (256, 512, 8),
    (512, 512, 8),
    (512, 512, 4),
]
BATCH = {64: 16, 32: 16, 16: 16, 8: 64, 4: 192}  # images per flush in a fit of 16-image batches


def _best(fn: Callable[..., object], repeats: int, *args: object) -> float:
    fn(*args)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args)
        best = min(best, time.perf_counter() - start)
    return best


def kernel_costs(scale: int = 1, repeats: int = 5) -> list[dict[str, float | str]]:
    """One row per layer: each kernel's time per statistic over the forward convolution's.

    >>> rows = kernel_costs(scale=64, repeats=1)
    >>> sorted(rows[0])
    ['layer', 'rule', 'unfold', 'weight_grad', 'weight_grad_cl']
    """
    torch.manual_seed(0)
    rows: list[dict[str, float | str]] = []
    for cin, cout, size in VGG16_64:
        cin, cout, size = max(1, cin // scale), max(1, cout // scale), max(4, size // scale)
        n = BATCH.get(size, 16)
        conv = torch.nn.Conv2d(cin, cout, 3, padding=1)
        geo = LayerGeometry.from_module(conv)
        x = torch.randn(n, cin, size, size)
        signals = torch.randn(n, 3 * cout + 1, size, size)
        with torch.no_grad():
            forward = _best(conv, repeats, x)
        row: dict[str, float | str] = {"layer": f"{cin} → {cout}, {size} px"}
        reference = None
        for method in geo.methods:
            cl = method == "weight_grad_cl"
            xc = geo.centred_input(x, torch.zeros(cin), channels_last=cl)
            sig = signals.contiguous(memory_format=torch.channels_last) if cl else signals
            result = geo.patch_sums(xc, sig, method)
            if reference is None:
                reference = result
            scale_ = float(reference.abs().max())
            if float((result - reference).abs().max()) > 1e-4 * scale_:
                raise AssertionError(f"{method} disagrees with the weight gradient")
            seconds = _best(geo.patch_sums, repeats, xc, sig, method)
            row[method] = seconds / forward / 3
        row["rule"] = geo.kernel_for(x.shape, x.device)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=int, default=1, help="divide widths and map sizes")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print("| layer | weight gradient | channels-last | unfold + matmul | rule |")
    print("| --- | --- | --- | --- | --- |")
    for row in kernel_costs(args.scale, args.repeats):
        print(
            f"| {row['layer']} | {row['weight_grad']:.2f} | {row['weight_grad_cl']:.2f} "
            f"| {row['unfold']:.2f} | {row['rule']} |"
        )


if __name__ == "__main__":
    main()
