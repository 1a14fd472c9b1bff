"""Per-token int8 inside bertkit's own forward (backend ``"torch-per-token"``): no export, padding-free.

The encoder's Linears are replaced, module by module, with products whose activations are quantized per token
(each row over its own range: no batch statistic, a row's result does not depend on the other rows) and whose
weights are int8 per output channel (and input group, see ``groups``), multiplied by ``torch._int_mm`` (int8 x int8 -> int32: oneDNN's VNNI
kernel on CPUs with AVX512-VNNI). The model stays a :class:`~bertkit.BertModel`, so
:class:`~bertkit.SentenceEncoder` keeps its packed (padding-free) path.

Per product ``y = x @ W^T + b``, with SmoothQuant's ``x / s`` and ``W * s`` (see :mod:`bertkit.quant.int8`)::

    a   = max_j |x_ij / s_j|                       per row i (and per group of input channels, see groups)
    q   = round(127 * x / (s a))                   int8 in [-127, 127]: every row over its full range
    y   = a/127 * (q @ W_q^T) * w_scale + b        int32 accumulators, then one pass to float

Inputs with a known lower bound ``lo`` (after GELU, >= -0.17) are shifted to ``v = x/s - lo/s >= 0`` and mapped
onto all 255 levels (``q = round(254 v / a) - 127``, twice the resolution of the signed grid); the offset
(``127 @ W_q^T``, to the int32 accumulators) and ``(lo/s) @ (W s)^T`` (in float, to the bias) are added back.

q, k and v share one product (one row scale, one GEMM of width 3 x hidden, one smoothing scale from the three
weights together) in :class:`PerTokenSelfAttention`; GELU and the residual add run in place on the product's
output (:class:`PerTokenIntermediate`, :class:`PerTokenOutput`), in per-thread reusable buffers: a fresh
8192 x 1536 float tensor costs more to allocate (page faults) than the passes over it.

``torch._int_mm`` is fast only where oneDNN gets VNNI: PyTorch calls oneDNN when ``is_avx512_vnni_supported()``
and otherwise runs a scalar triple loop (aten/src/ATen/native/LinearAlgebra.cpp, ``_int_mm_out_cpu``).
:func:`torch_int8_supported` says whether this CPU qualifies; elsewhere (AVX2-only, AVX-VNNI-only)
:func:`bertkit.quant.int8.default_backend` picks onnxruntime's u8s8 kernels.
"""

from __future__ import annotations

import threading

import torch
from torch import nn

from .. import cpu
from ..nn.attention import BertSelfAttention
from ..nn.layer import BertIntermediate, BertOutput, BertSelfOutput

EPS = 1e-12


def torch_int8_supported(flags: frozenset[str] | None = None) -> tuple[bool, str]:
    """(True, "") when ``torch._int_mm`` runs on oneDNN's VNNI kernels here, else (False, why)."""
    flags = cpu.cpu_flags() if flags is None else flags
    if "avx512_vnni" not in flags:
        return False, ("this CPU has no AVX512-VNNI, where torch._int_mm is a scalar loop "
                       f"(CPU: {cpu.describe(flags)})")
    if not hasattr(torch, "_int_mm") or not torch.backends.mkldnn.is_available():
        return False, f"this PyTorch ({torch.__version__}) has no oneDNN int8 matmul (torch._int_mm)"
    if not torch.backends.mkldnn.enabled:
        return False, "oneDNN is switched off (torch.backends.mkldnn.enabled is False)"
    return True, ""


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, in)`` float weight -> (int8 weight, float32 scale per output row), symmetric."""
    scale = weight.abs().amax(dim=1).clamp(min=EPS) / 127.0
    return torch.clamp(torch.round(weight / scale[:, None]), -127, 127).to(torch.int8), scale.float()


class PerTokenLinear(nn.Module):
    """``x @ W^T + b`` with per-token int8 activations and per-channel int8 weights (see the module docstring).

    Args:
        weight, bias: The float Linear's (already multiplied by the smoothing scale ``s``, if any).
        inv_scale: ``1 / s`` per input channel, or None (no smoothing).
        lower: A lower bound of the input (a float, e.g. GELU's -0.1701), or None: signed rows.
        activation: Applied to the output in place ("gelu", "gelu_tanh" or None).
        groups: Each row's input channels are split into this many equal groups, each quantized over its own
            range (one int8 product per group, summed in float): finer scales for wide inputs (the MLP
            down-projection), at the cost of ``groups - 1`` extra passes over the output.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, inv_scale: torch.Tensor | None = None,
                 lower: float | None = None, activation: str | None = None, groups: int = 1):
        super().__init__()
        if activation not in (None, "gelu", "gelu_tanh"):
            raise ValueError(f"activation must be None, 'gelu' or 'gelu_tanh', got {activation!r}")
        weight = weight.detach().float()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        if groups < 1 or self.in_features % groups:
            raise ValueError(f"groups={groups} must divide in_features={self.in_features}")
        self.activation, self.groups = activation, groups
        bias = torch.zeros(self.out_features) if bias is None else bias.detach().float().clone()
        self.smoothed = inv_scale is not None
        inv = torch.ones(self.in_features) if inv_scale is None else inv_scale.detach().float()
        self.register_buffer("inv_scale", inv)
        # int8 weights with a scale per output channel and input group: (out, in), (groups, out)
        w_q, w_scale = zip(*(quantize_weight(part) for part in weight.chunk(groups, dim=1)))
        w_q, w_scale = torch.cat(w_q, dim=1), torch.stack(w_scale)
        self.unsigned = lower is not None
        if self.unsigned:
            # v = x/s - lo/s >= 0 is quantized to q = round(254 v / a) - 127 in [-127, 127]:
            # x/s @ (W s)^T = a/254 * (q + 127) @ W^T + (lo/s) @ (W s)^T, the last term exact, into the bias.
            shift = -float(lower) * inv
            bias -= weight @ shift
            self.register_buffer("shift", shift)
            # 127 * the column sums of W_q^T per group, (groups, out): added to the int32 accumulators, exact
            self.register_buffer("offset", (127 * w_q.int().view(self.out_features, groups, -1).sum(-1)).t()
                                 .contiguous())
        self.register_buffer("bias", bias)
        # (groups, in / groups, out): torch._int_mm's layout, one block per group
        self.register_buffer("weight_t", w_q.t().contiguous().view(groups, -1, self.out_features))
        self.register_buffer("weight_scale", w_scale)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, smoothed={self.smoothed}, "
                f"unsigned={self.unsigned}, activation={self.activation}, groups={self.groups}")

    def quantize_rows(self, x: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """2-D float ``x`` -> (int8 ``(rows, in)``, the factors ``(rows, groups)`` that take each group's int32
        product back to float). Works in this thread's workspace; ``x`` itself is not changed."""
        v = _workspace("v", rows, self.in_features, torch.float32)
        grouped = v.view(rows, self.groups, -1)
        if self.unsigned:
            torch.addcmul(self.shift, x, self.inv_scale, out=v)  # x/s - lo/s >= 0
            a = grouped.amax(dim=2, keepdim=True).clamp_(min=EPS)
            torch.addcmul(_MINUS_127, grouped, 254.0 / a, out=grouped)  # [0, a] -> [-127, 127]
            factor = a / 254.0
        else:
            torch.mul(x, self.inv_scale, out=v) if self.smoothed else v.copy_(x)
            a = torch.maximum(grouped.amax(dim=2, keepdim=True), grouped.amin(dim=2, keepdim=True).neg_())
            grouped.mul_(127.0 / a.clamp_(min=EPS))
            factor = a / 127.0
        q = _workspace("q", rows, self.in_features, torch.int8)
        q.copy_(v.round_())
        return q, factor.view(rows, self.groups)

    @torch.no_grad()  # inference only; the workspace buffers must never join an autograd graph
    def forward(self, x: torch.Tensor, workspace: str | None = None) -> torch.Tensor:
        """The product: a new tensor, or with ``workspace`` a view of that buffer of this thread's workspace,
        valid until the next product written there (for callers that consume it at once)."""
        shape = x.shape
        x = x.reshape(-1, self.in_features)
        if x.dtype != torch.float32:
            x = x.float()
        rows, width = x.shape[0], self.in_features // self.groups
        q, factor = self.quantize_rows(x, rows)
        acc = _workspace("acc", rows, self.out_features, torch.int32)
        y = (torch.empty(rows, self.out_features) if workspace is None
             else _workspace(workspace, rows, self.out_features, torch.float32))
        part = None if self.groups == 1 else _workspace("part", rows, self.out_features, torch.float32)
        for g in range(self.groups):  # every step works row by row: a row's result ignores the other rows
            torch._int_mm(q[:, g * width:(g + 1) * width] if self.groups > 1 else q, self.weight_t[g], out=acc)
            if self.unsigned:
                acc.add_(self.offset[g])  # (q + 127) @ W_q^T
            if g == 0:
                y.copy_(acc).mul_(self.weight_scale[0])
                if self.groups == 1:
                    torch.addcmul(self.bias, y, factor, out=y)
                else:
                    y.mul_(factor[:, :1])
            else:
                y.addcmul_(part.copy_(acc).mul_(self.weight_scale[g]), factor[:, g:g + 1])
        if self.groups > 1:
            y.add_(self.bias)
        if self.activation == "gelu":
            torch.ops.aten.gelu_(y)
        elif self.activation == "gelu_tanh":
            torch.ops.aten.gelu_(y, approximate="tanh")
        return y.view(*shape[:-1], self.out_features)


# Tokens per forward that SentenceEncoder uses with this backend unless told otherwise (max_batch_tokens): batch
# 128 of 256-token texts (32768 tokens) ran at 30 texts/s, in chunks of 8192 tokens at 45/s (mixed lengths:
# 41 -> 71/s; short texts unchanged), 2 threads, AVX512-VNNI: the buffers of larger batches outgrow the caches.
BATCH_TOKENS = 8192

_MINUS_127 = torch.tensor(-127.0)
_THREAD = threading.local()


def release_buffers() -> None:
    """Frees this thread's reusable buffers (they grow to the largest batch seen: about 50 MB per buffer for
    8192 tokens x 1536 channels); the next product allocates them again."""
    _THREAD.__dict__.pop("buffers", None)


def _workspace(name: str, rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
    """A ``(rows, cols)`` tensor from this thread's reusable buffer ``name``. Fresh allocations of this size
    cost more than the work done in them (page faults: 23 ms to allocate and fill 8192 x 1536 floats, 2 ms to
    fill them in place, 1 thread), so the products reuse one buffer per role and thread."""
    buffers = _THREAD.__dict__.setdefault("buffers", {})
    flat = buffers.get(name)
    if flat is None or flat.numel() < rows * cols:
        with torch.inference_mode(False):  # a normal tensor: usable in and out of inference mode
            flat = buffers[name] = torch.empty(rows * cols, dtype=dtype)
    return flat[: rows * cols].view(rows, cols)


class PerTokenIntermediate(nn.Module):
    """BERT's MLP up-projection with its activation applied in place on the product's output (replaces a
    :class:`~bertkit.nn.layer.BertIntermediate`)."""

    def __init__(self, dense: PerTokenLinear):
        super().__init__()
        self.dense = dense

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # consumed at once by the layer's output block (PerTokenOutput quantizes it before its own product)
        return self.dense(hidden_states, workspace="mlp")


class PerTokenOutput(nn.Module):
    """Projection, residual add (in place on the product's output) and the post-norm slot (replaces a
    :class:`~bertkit.nn.layer.BertSelfOutput` / ``BertOutput`` in inference: no dropout)."""

    def __init__(self, dense: PerTokenLinear, layer_norm: nn.Module):
        super().__init__()
        self.dense = dense
        self.LayerNorm = layer_norm

    def forward(self, hidden_states: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        y = self.dense(hidden_states, workspace="out")
        if isinstance(self.LayerNorm, nn.Identity):  # pre-norm: the sum is the residual stream, a fresh tensor
            return y + residual
        return self.LayerNorm(y.add_(residual))


class PerTokenSelfAttention(BertSelfAttention):
    """A :class:`~bertkit.nn.attention.BertSelfAttention` whose q, k and v come from one per-token int8 product
    (``qkv``, width 3 x all_head_size). Made by :func:`fuse_qkv` from a float module (self-attention only)."""

    def _project_qkv(self, hidden_states: torch.Tensor):
        # consumed by this module's attention before the next layer's q/k/v product
        return self.qkv(hidden_states, workspace="qkv").split(self.all_head_size, dim=-1)


def _smoothing(weight: torch.Tensor, amax: torch.Tensor | None, alpha: float) -> torch.Tensor | None:
    # SmoothQuant's s_j = a_j^alpha / w_j^(1 - alpha), w_j = max over output rows of |W[:, j]|
    if amax is None or alpha <= 0:
        return None
    w_amax = weight.abs().amax(dim=0).float().clamp(min=1e-5)
    return (amax.float().clamp(min=1e-5) ** alpha / w_amax ** (1 - alpha)).clamp(min=1e-5)


def per_token_linear(linear: nn.Linear, amax: torch.Tensor | None, alpha: float,
                     lower: float | None = None, groups: int = 1) -> PerTokenLinear:
    """A :class:`PerTokenLinear` for a float ``nn.Linear``, smoothed with input statistics ``amax`` (max |x| per
    input channel, None: no smoothing)."""
    weight = linear.weight.detach().float()
    s = _smoothing(weight, amax, alpha)
    if s is None:
        return PerTokenLinear(weight, linear.bias, None, lower, groups=groups)
    return PerTokenLinear(weight * s, linear.bias, 1.0 / s, lower, groups=groups)


def fuse_qkv(attention: BertSelfAttention, amax: torch.Tensor | None, alpha: float) -> None:
    """Turns a float self-attention module (in place) into a :class:`PerTokenSelfAttention`: one product for q,
    k and v with one smoothing scale (from the three weights together)."""
    parts = (attention.query, attention.key, attention.value)
    weight = torch.cat([m.weight.detach().float() for m in parts])
    bias = torch.cat([m.bias.detach().float() if m.bias is not None else torch.zeros(m.out_features)
                      for m in parts])
    fused = nn.Linear(weight.shape[1], weight.shape[0])
    fused.weight.data, fused.bias.data = weight, bias
    qkv = per_token_linear(fused, amax, alpha)
    for name in ("query", "key", "value"):
        delattr(attention, name)
    attention.__class__ = PerTokenSelfAttention
    attention.qkv = qkv


# hidden_act -> the in-place activation PerTokenLinear applies; others stay a separate call.
FUSED_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                     "gelu_fast": "gelu_tanh"}


def convert(model: nn.Module, stats: dict[str, torch.Tensor] | None, alpha: float,
            lower_bounds: dict[str, float] | None = None, fused_qkv: bool = True,
            groups: dict[str, int] | None = None, alphas: dict[str, float] | None = None) -> nn.Module:
    """Replaces (in place) every ``nn.Linear`` of ``model``'s encoder with a :class:`PerTokenLinear`; BERT's
    MLP and output blocks with :class:`PerTokenIntermediate` / :class:`PerTokenOutput` (activation and residual
    add in place), and q/k/v with one product (:class:`PerTokenSelfAttention`).

    Args:
        model: A float ``BertModel`` in eval mode (a copy: it is changed).
        stats: ``{qualified Linear name: max |x| per input channel}`` from calibration
            (:func:`bertkit.quant.int8.input_channel_amax`), or None: no smoothing.
        alpha: SmoothQuant migration strength.
        lower_bounds: ``{qualified Linear name: lower bound of its input}`` (unsigned rows there).
        fused_qkv: One product for q, k and v in each self-attention module.
        groups: ``{qualified Linear name: input channel groups}`` (see :class:`PerTokenLinear`), default 1.
        alphas: ``{qualified Linear name: alpha}`` where it differs from ``alpha`` (for a fused q/k/v product:
            the name of ``query``).
    """
    alphas = alphas or {}
    stats = stats or {}
    lower_bounds = lower_bounds or {}
    groups = groups or {}
    model.requires_grad_(False)  # an inference model (the int8 products have no gradient)

    def in_encoder(name):
        return name.startswith("encoder.") or ".encoder." in name

    activation = FUSED_ACTIVATIONS.get(getattr(model.config, "hidden_act", None))
    for name, module in list(model.named_modules()):
        if not in_encoder(name) or not isinstance(module, nn.Module) or module.__class__ in (PerTokenSelfAttention,):
            continue
        if (fused_qkv and type(module) is BertSelfAttention and not module.is_cross_attention
                and all(type(getattr(module, n)) is nn.Linear for n in ("query", "key", "value"))):
            fuse_qkv(module, stats.get(f"{name}.query"), alphas.get(f"{name}.query", alpha))
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}"
            if type(child) is BertIntermediate and activation is not None and type(child.dense) is nn.Linear:
                dense = per_token_linear(child.dense, stats.get(f"{full}.dense"), alphas.get(f"{full}.dense", alpha))
                dense.activation = activation
                setattr(module, child_name, PerTokenIntermediate(dense))
            elif (type(child) in (BertSelfOutput, BertOutput) and type(child.dense) is nn.Linear
                  and not any(hook in child._modules for hook in child.quantizer_hooks)):
                dense = per_token_linear(child.dense, stats.get(f"{full}.dense"), alphas.get(f"{full}.dense", alpha),
                                         lower_bounds.get(f"{full}.dense"), groups.get(f"{full}.dense", 1))
                setattr(module, child_name, PerTokenOutput(dense, child.LayerNorm))
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if type(child) is nn.Linear and in_encoder(full):
                setattr(module, child_name, per_token_linear(child, stats.get(full), alphas.get(full, alpha),
                                                             lower_bounds.get(full),
                                                             groups.get(full, 1)))
    return model
