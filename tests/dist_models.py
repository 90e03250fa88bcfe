"""Stand-ins for the multi-process command-line tests: a tiny ResNet that stops or fails.

The command line calls a factory without arguments, so what to do is read from
environment variables the test sets: ``STOP_AT_BATCH=k`` raises
``KeyboardInterrupt`` (as Ctrl-C would) when the ``k``-th batch of full size
``FULL_BATCH`` starts (counted from 1; the fitter's one-image probe does not count),
and ``FAIL_RANK=r`` makes rank ``r`` raise a ``RuntimeError`` there instead
(with ``HANG=1``: sleep for ten minutes, as a stuck process would).
"""

from __future__ import annotations

import os
import time

import torch
from cli_models import TinyResNet


class Interrupted(TinyResNet):
    def __init__(self) -> None:
        super().__init__()
        self.full_batches = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == int(os.environ.get("FULL_BATCH", "2")):
            self.full_batches += 1
            if self.full_batches == int(os.environ.get("STOP_AT_BATCH", "0")):
                fail = os.environ.get("FAIL_RANK")
                if fail is None:
                    raise KeyboardInterrupt
                if fail == os.environ.get("RANK") and os.environ.get("HANG"):
                    time.sleep(600)
                if fail == os.environ.get("RANK"):
                    raise RuntimeError(f"rank {fail} breaks down on purpose")
        return super().forward(x)


def interrupted() -> torch.nn.Module:
    return Interrupted()
