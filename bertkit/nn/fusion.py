"""Fused Linears for CPU inference: one oneDNN call for ``act(x @ W.T + b)`` or ``x @ W.T + b + residual``,
and one GEMM for q, k and v.

Eager PyTorch runs a BERT layer's Linears as ``addmm`` followed by separate passes for the activation and
the residual add; each pass reads and writes the whole activation tensor again. oneDNN's matmul applies
GELU and the residual add in the GEMM's epilogue, while the tile is still in cache
(``torch.ops.mkldnn._linear_pointwise``, the kernel inductor's CPU backend uses). The q/k/v projections
read the same input, so one GEMM of width ``3 * hidden`` replaces three.

Measured on all-MiniLM-L6-v2's shapes (``benchmarks/cpu_kernels.py``, docs/benchmarks.md): a layer's
Linear work 1.3x faster on an AVX-512 EPYC; numbers within 1e-5 of the unfused path.

Used automatically, and only where it is exact to use: CPU tensors in float32 or bfloat16, autograd off
(``torch.no_grad`` / ``torch.inference_mode``), the module in eval mode, a plain ``nn.Linear`` with a bias
(quantized replacements keep their own path) without forward hooks (they would not run), and PyTorch built with oneDNN (``torch.backends.mkldnn``).
:func:`enabled` switches it off for one block (benchmarks compare both in one process).
"""

from __future__ import annotations

import contextlib
import os
import threading

import torch
import torch.nn.functional as F
from torch import nn

# oneDNN's GELU post-ops by bertkit activation name: exact (erf) and the tanh approximation.
GELU_ALGORITHMS = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_fast": "tanh"}

_state = {"on": os.environ.get("BERTKIT_CPU_FUSION", "1") != "0", "kernel": None}

# oneDNN builds a primitive for every new row count (0.7-1.1 ms each, four shapes per layer): on a small batch
# (a batch-1 request) that is more than the fused kernels save, and small batches come in many row counts. So a
# forward with fewer rows runs unfused. A rule on the shape alone, never on history: the same input always takes
# the same path, so results repeat bit for bit (a resumed embed equals an uninterrupted one).
MIN_ROWS = 512
_local = threading.local()


@contextlib.contextmanager
def forward_scope(x: torch.Tensor):
    """Decides once per encoder forward, from its input ``x``, whether the fused kernels may run in it."""
    rows = x.numel() // x.shape[-1] if x.dim() and x.shape[-1] else 0
    allow = rows >= MIN_ROWS
    before = getattr(_local, "allow", True)
    _local.allow = allow
    try:
        yield
    finally:
        _local.allow = before


@contextlib.contextmanager
def enabled(on: bool):
    """``with fusion.enabled(False):`` runs the unfused path (the reference) inside the block."""
    before = _state["on"]
    _state["on"] = on
    try:
        yield
    finally:
        _state["on"] = before


def _kernel():
    if _state["kernel"] is None:
        kernel = False
        if torch.backends.mkldnn.is_available():
            try:
                kernel = torch.ops.mkldnn._linear_pointwise
            except (AttributeError, RuntimeError):  # a build without the op
                kernel = False
        _state["kernel"] = kernel
    return _state["kernel"]


def applies(module: nn.Module, x: torch.Tensor, *linears: nn.Module) -> bool:
    """True when the fused kernels may replace ``linears`` (run by ``module``) on input ``x``."""
    if not _state["on"] or not getattr(_local, "allow", True) or module.training or torch.is_grad_enabled() \
            or x.device.type != "cpu":
        return False
    if x.dtype not in (torch.float32, torch.bfloat16) or not torch.backends.mkldnn.enabled:
        return False
    if not all(type(m) is nn.Linear and m.bias is not None and m.weight.dtype == x.dtype and m.weight.numel()
               and not _hooked(m) for m in linears):  # numel: all heads pruned leaves 0-wide Linears
        return False
    if not x.numel():
        return False
    return bool(_kernel())


def _hooked(module: nn.Module) -> bool:
    # The fused kernels never call the Linear modules, so their hooks (calibration statistics, activation
    # capture) would silently not run: a hooked Linear keeps the module call.
    from torch.nn.modules import module as torch_module

    return bool(module._forward_hooks or module._forward_pre_hooks or torch_module._global_forward_hooks
                or torch_module._global_forward_pre_hooks)


def linear_act(x: torch.Tensor, linear: nn.Linear, algorithm: str) -> torch.Tensor:
    """``gelu(linear(x))`` in one oneDNN call; ``algorithm`` is ``"none"`` (exact) or ``"tanh"``."""
    return _kernel()(x, linear.weight, linear.bias, "gelu", [], algorithm)


def linear_add(x: torch.Tensor, linear: nn.Linear, residual: torch.Tensor) -> torch.Tensor:
    """``linear(x) + residual`` in one oneDNN call."""
    if residual.shape[:-1] != x.shape[:-1] or not residual.is_contiguous():
        return F.linear(x, linear.weight, linear.bias) + residual
    return _kernel().binary(x, residual, linear.weight, linear.bias, "add")


class StackedLinear:
    """The weights of several Linears that read the same input, stacked for one GEMM; rebuilt when any of
    them changes (an optimizer step, ``load_state_dict``, ``.to()``). Not a module: never in a state dict."""

    def __init__(self):
        self.key = None
        self.weight = self.bias = None

    def __call__(self, x: torch.Tensor, linears: tuple[nn.Linear, ...]) -> torch.Tensor:
        key = tuple((p.data_ptr(), p._version, p.dtype) for m in linears for p in (m.weight, m.bias))
        if key != self.key:
            self.weight = torch.cat([m.weight.detach() for m in linears])
            self.bias = torch.cat([m.bias.detach() for m in linears])
            self.key = key
        return _kernel()(x, self.weight, self.bias, "none", [], "")
