"""Real int8 inference on CPU: a copy of a float model that runs int8 matrix multiplies.

Four backends (measured in ``benchmarks/cpu_engines.py`` and ``benchmarks/quant_int8.py``; docs/benchmarks.md).
The default is chosen for the CPU found (:func:`default_backend`): ``"torch-per-token"`` where PyTorch's int8
product runs on VNNI (AVX512-VNNI, AMX), else ``"onnxruntime-dynamic"`` (onnxruntime's u8s8 kernels, AVX2 too).

* ``"torch-per-token"``: the same per-token scheme inside bertkit's own forward (:mod:`bertkit.quant.torch_int8`):
  each encoder Linear becomes an int8 product (``torch._int_mm``, oneDNN's VNNI kernel), q/k/v one product, the
  MLP down-projection with four input groups of its own row and weight scales; no export, padding-free (the
  model stays a ``BertModel``). Off VNNI, ``torch._int_mm`` is a scalar loop: never the default there.
* ``"onnxruntime-dynamic"``: per-token dynamic activation scales and per-channel int8 weights
  (:mod:`bertkit.quant.per_token`) on the float export, run by onnxruntime's u8s8 kernels (VNNI, AVX2 or
  AMX, whichever the CPU has). Each token is quantized over its own range, so no batch statistic and no
  calibrated activation range is involved: on all-MiniLM-L6-v2 the minimum cosine to fp32 is 0.995-0.998
  on short, medium, long, mixed and real text, where per-tensor int8 (the backends below, sentence-transformers'
  qint8 ONNX) stays at 0.95-0.99. The MLP down-projection's input (after GELU, >= -0.17) is quantized
  unsigned, with twice the resolution.
* ``"onnxruntime"``: static per-tensor QDQ: the model is quantized with bertkit's own QDQ placement (Linear
  inputs and weights only; the attention-matmul and residual-add Q/DQ pairs have no int8 kernel on CPU
  and only cost time), calibrated, exported with :func:`~bertkit.quant.export_onnx`, and run by
  onnxruntime, whose graph optimizer fuses each ``DQ -> MatMul`` into an int8 kernel. About 10% faster
  than the dynamic backend, less accurate on inputs unlike the calibration data.
* ``"torch"``: ``torch.ao.quantization.quantize_dynamic`` with per-channel weights; activations are
  quantized per batch at run time (fbgemm uses 7 bits for them, ``reduce_range=True``). torch 2.13 marks
  ``torch.ao.quantization`` deprecated.

All apply SmoothQuant-style smoothing first (Xiao et al. 2023): BERT activations carry a few outlier
channels (on all-MiniLM-L6-v2, per-tensor amax up to 30 at the MLP inputs), which costs per-tensor
int8 activations most of their resolution. With calibration statistics ``a_j = max|X_j|`` and
``w_j = max|W[:, j]|`` each Linear computes ``(X / s) @ (W * s)^T`` with ``s_j = a_j**alpha / w_j**(1 - alpha)``
-- the same product in float, but the outliers move into the weights, which are quantized per output channel.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import tempfile
import warnings
from typing import Iterable, Mapping

import torch
from torch import nn

from ..models import BertModel
from ..outputs import BaseModelOutput
from .transform import QuantConfig, calibrate, quantize

INSTALL_HINT = "pip install 'bertkit[int8]'"
BACKENDS = ("torch-per-token", "onnxruntime-dynamic", "onnxruntime", "torch")
# The default where "torch-per-token" has no fast kernel; default_backend() decides at run time.
DEFAULT_BACKEND = "onnxruntime-dynamic"
# Per-tensor activations, on all-MiniLM-L6-v2: 0.5 lets the MLP down-projection weights absorb too much.
DEFAULT_ALPHA = 0.85
# Per-token activations already absorb outlier tokens; on all-MiniLM-L6-v2 alpha 0.5 gave the best minimum cosine
# (0.3: 0.987, 0.4: 0.993, 0.5: 0.995, 0.6: 0.979 on mixed-length random-word texts).
DYNAMIC_ALPHA = 0.5


class MissingExtraError(ImportError, ValueError):
    """An optional dependency is not installed. An ImportError for library code; a ValueError so that the
    command line prints its one-line message (exit status 2) instead of a traceback."""


def require_onnx(what: str, runtime: bool = True) -> None:
    """Raises :class:`MissingExtraError` naming ``what`` and the install command unless ``onnx`` (and, with
    ``runtime``, ``onnxruntime``) can be imported. Call it before loading a model, so the user learns it first."""
    needed = ("onnx", "onnxruntime") if runtime else ("onnx",)
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        raise MissingExtraError(f"{what} needs {' and '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} "
                                f"not installed; run `{INSTALL_HINT}`")


def default_backend(flags: frozenset[str] | None = None) -> str:
    """The fastest measured backend for this CPU: "torch-per-token" with AVX512-VNNI (AMX CPUs have it too; and
    a PyTorch whose ``torch._int_mm`` calls oneDNN), else "onnxruntime-dynamic". ``flags``: the CPU's, for tests."""
    from .torch_int8 import torch_int8_supported

    return "torch-per-token" if torch_int8_supported(flags)[0] else DEFAULT_BACKEND


def require_int8(what: str, backend: str | None = None) -> str:
    """Checks, before any model loads, that ``backend`` (None: :func:`default_backend`) can run here; returns it.

    Raises :class:`MissingExtraError` naming what is missing, why it is needed on this CPU, and the install
    command (the onnxruntime backends need ``onnx`` and ``onnxruntime``; "torch-per-token" needs nothing more).
    """
    chosen = default_backend() if backend is None else backend
    if chosen == "torch-per-token":
        from .torch_int8 import torch_int8_supported

        ok, why = torch_int8_supported()
        if backend is not None and not ok:
            warnings.warn(f"backend 'torch-per-token' runs slowly here: {why}", stacklevel=3)
        return chosen
    if chosen != "torch":
        from .torch_int8 import torch_int8_supported

        ok, why = torch_int8_supported()
        reason = "" if backend is not None or ok else f" (int8 runs on onnxruntime here: {why})"
        require_onnx(what + reason)
    return chosen


class PreScaled(nn.Module):
    """``linear(x * inv_scale)``: the input half of SmoothQuant's ``(X / s) @ (W * s)^T``."""

    def __init__(self, linear: nn.Module, inv_scale: torch.Tensor):
        super().__init__()
        self.linear = linear
        self.register_buffer("inv_scale", inv_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x * self.inv_scale)


def _encoder_linears(model: nn.Module):
    # (parent, attribute, qualified name) of every nn.Linear inside the encoder.
    for name, module in model.named_modules():
        for child_name, child in module.named_children():
            full = f"{name}.{child_name}" if name else child_name
            if type(child) is nn.Linear and (full.startswith("encoder.") or ".encoder." in full):
                yield module, child_name, full


@torch.no_grad()
def input_channel_amax(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """max |x| per input channel of every encoder Linear, over the calibration batches (streamed)."""
    stats: dict[str, torch.Tensor] = {}
    hooks = []
    for parent, attr, name in _encoder_linears(model):
        def hook(module, args, name=name):
            amax = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(dim=0).float()
            stats[name] = amax if name not in stats else torch.maximum(stats[name], amax)
        hooks.append(getattr(parent, attr).register_forward_pre_hook(hook))
    was_training = model.training
    model.eval()
    try:
        seen = 0
        for batch in batches:
            model(**batch)
            seen += 1
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    if not seen:
        raise ValueError("calibration batches are empty; pass a few batches of representative inputs "
                         "(e.g. calibration_batches(tokenizer, texts))")
    return stats


@torch.no_grad()
def smooth(model: nn.Module, stats: Mapping[str, torch.Tensor], alpha: float = DEFAULT_ALPHA) -> nn.Module:
    """Rewrites every encoder Linear of ``model`` (in place) as ``PreScaled(linear with W * s, 1 / s)``."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    for parent, attr, name in list(_encoder_linears(model)):
        linear = getattr(parent, attr)
        w_amax = linear.weight.abs().amax(dim=0).float().clamp(min=1e-5)
        s = (stats[name].clamp(min=1e-5) ** alpha / w_amax ** (1 - alpha)).clamp(min=1e-5)
        linear.weight.mul_(s.to(linear.weight.dtype))
        setattr(parent, attr, PreScaled(linear, (1.0 / s).to(linear.weight.dtype)))
    return model


def calibration_batches(tokenizer, texts: list[str], batch_size: int = 32, max_length: int = 128):
    """Tokenized batches (dicts of tensors) of ``texts`` for :func:`to_int8`."""
    if not texts:
        raise ValueError("no calibration texts; pass a few dozen texts like the ones the model will see")
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(texts[i:i + batch_size], padding=True, truncation=True, max_length=max_length)
        yield {k: torch.as_tensor(enc[k]) for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}


class OnnxRuntimeModel(nn.Module):
    """An onnxruntime session (int8 QDQ or float graph) behind BertModel's ``forward`` signature.

    Returns a :class:`~bertkit.outputs.BaseModelOutput` (``last_hidden_state``, ``pooler_output`` when
    the model had a pooler). ``config`` is the float model's. It has one dummy Parameter so that code
    asking ``next(model.parameters()).device`` (SentenceEncoder does) gets the CPU.
    """

    def __init__(self, path: str | bytes, config, threads: int | None = None):
        super().__init__()
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # path: a file name, or the serialized graph (bytes).
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.config = config
        self._device_anchor = nn.Parameter(torch.zeros(()), requires_grad=False)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, return_dict=None, **unused):
        if unused and any(v is not None and v is not False for v in unused.values()):
            raise ValueError(f"the onnxruntime int8 model takes input_ids, attention_mask and token_type_ids only; "
                             f"got {sorted(k for k, v in unused.items() if v is not None)}")
        feed = {"input_ids": input_ids,
                "attention_mask": torch.ones_like(input_ids) if attention_mask is None else attention_mask,
                "token_type_ids": torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids}
        feed = {k: v.detach().cpu().to(torch.int64).numpy() for k, v in feed.items()}
        out = dict(zip(self.output_names, (torch.from_numpy(a) for a in self.session.run(None, feed))))
        result = BaseModelOutput(out["last_hidden_state"], out.get("pooler_output"))
        return result if return_dict is not False else result.to_tuple()


def to_int8(model: nn.Module, calibration: Iterable[Mapping[str, torch.Tensor]], backend: str | None = None,
            alpha: float | None = None, calib_method: str = "max", path: str | None = None) -> nn.Module:
    """An int8 copy of a float ``BertModel`` with the same ``forward`` inputs and outputs.

    Args:
        model: A float32 ``bertkit.BertModel`` (left unchanged).
        calibration: Batches (dicts with input_ids / attention_mask / token_type_ids) of representative
            inputs; see :func:`calibration_batches`. Iterated for smoothing, then (static backend) calibration.
        backend: None (default: :func:`default_backend` for this CPU), "torch-per-token" (per-token int8 in
            bertkit's forward, :mod:`bertkit.quant.torch_int8`), "onnxruntime-dynamic" (per-token activation
            scales in onnxruntime, :mod:`bertkit.quant.per_token`), "onnxruntime" (static per-tensor QDQ) or
            "torch" (``quantize_dynamic``, per-tensor).
        alpha: SmoothQuant migration strength (0 disables smoothing; default DYNAMIC_ALPHA for the per-token
            backends, DEFAULT_ALPHA for the others).
        calib_method: Activation calibration of the onnxruntime backend ("max", "percentile", ...).
        path: Where the onnxruntime backend writes its ``.onnx`` to keep (default: a temporary file, deleted
            once the session is loaded).

    Returns:
        :class:`OnnxRuntimeModel`, or a ``BertModel`` with int8 modules ("torch-per-token", "torch"), in eval mode.
    """
    if backend is None:
        backend = default_backend()
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} is unknown; use one of {', '.join(BACKENDS)}")
    if not isinstance(model, BertModel):
        raise ValueError(f"to_int8 takes a bertkit.BertModel (e.g. SentenceEncoder.model), got "
                         f"{type(model).__name__}; for task models use quantize() + export_onnx()")
    if backend not in ("torch", "torch-per-token"):
        require_onnx(f"int8 inference (backend {backend!r})")
    if alpha is None:
        alpha = DYNAMIC_ALPHA if backend in ("onnxruntime-dynamic", "torch-per-token") else DEFAULT_ALPHA
    calibration = list(calibration)
    work = copy.deepcopy(model).float().eval()
    if backend == "torch-per-token":
        return _torch_per_token(work, input_channel_amax(work, calibration) if alpha > 0 else None, alpha)
    if alpha > 0:
        smooth(work, input_channel_amax(work, calibration), alpha)
    if backend == "torch":
        return quantize_dynamic_int8(work, smoothed=True)
    if backend == "onnxruntime-dynamic":
        return _per_token_session(work, model.config, path)
    quantize(work, QuantConfig(matmul_inputs=False, residual_adds=False, heads=False, calib_method=calib_method))
    with calibrate(work):
        for batch in calibration:
            work(**batch)
    from .onnx_export import export_onnx

    if path is not None:
        export_onnx(work, path)
        return OnnxRuntimeModel(path, model.config).eval()
    # The session keeps the graph in memory: the temporary file (90 MB for all-MiniLM-L6-v2) goes as soon as
    # the session exists, or when anything fails on the way.
    with tempfile.TemporaryDirectory(prefix="bertkit-int8-") as folder:
        path = os.path.join(folder, "model.onnx")
        export_onnx(work, path)
        return OnnxRuntimeModel(path, model.config).eval()


# The smallest value of each activation (GELU(x) = x * Phi(x) >= -0.16997 at x = -0.75; the tanh form alike),
# rounded down: the MLP down-projection's input is then quantized unsigned, with twice the resolution.
ACTIVATION_MIN = {"gelu": -0.1701, "gelu_new": -0.1701, "gelu_pytorch_tanh": -0.1701, "gelu_fast": -0.1701,
                  "relu": 0.0}


def _activation_bounds(work: nn.Module, config, scaled: bool = True) -> dict[str, torch.Tensor]:
    """{module name: lower bound of its input} for the MLP down-projections (``scaled``: times the smoothing's
    ``1 / s`` of a :class:`PreScaled` module, per channel)."""
    low = ACTIVATION_MIN.get(config.hidden_act) if isinstance(config.hidden_act, str) else None
    if low is None:
        return {}
    bounds = {}
    for name, module in work.named_modules():
        # BERT's MLP down-projection is "<layer>.output.dense" (the attention's is "<layer>.attention.output.dense")
        if name.endswith(".output.dense") and ".attention." not in name:
            scale = module.inv_scale if scaled and isinstance(module, PreScaled) else torch.ones(())
            bounds[name] = (low * scale).float().numpy()
    return bounds


def _module_name(node_name: str) -> str:
    # The exporter names nodes by module scope: "/model/encoder/layer.0/output/dense/linear/MatMul".
    parts = node_name.strip("/").split("/")[1:-1]  # without the export wrapper's "model" and the op
    return ".".join(parts[:-1] if parts and parts[-1] == "linear" else parts)


# torch-per-token: q/k/v share one smoothing scale (one product); alpha 0.65 there, 0.5 elsewhere. Minimum cosine
# to fp32 on all-MiniLM-L6-v2 (64 random-word texts per bucket of cpu_engines.py, the 24 built-in sentences),
# long / real: 0.5 -> 0.9963 / 0.9946, 0.65 -> 0.9968 / 0.9960, 0.8 -> 0.9966 / 0.9963; q/k/v as three
# products (alpha 0.5 each): 0.9971 / 0.9956, at three GEMMs instead of one.
QKV_ALPHA = 0.65
# The MLP down-projection (1536 inputs on all-MiniLM-L6-v2), the product that costs int8 the most accuracy, in
# four groups of input channels, each with its own row scales and weight scales: minimum cosine long / mixed /
# real 0.9953 / 0.9955 / 0.9954 with one group -> 0.9971 / 0.9968 / 0.9956 (same texts; in float32: 0.9986 /
# 0.9986 / 0.9976).
DOWN_GROUPS = 4


def _torch_per_token(work: nn.Module, stats: dict[str, torch.Tensor] | None, alpha: float) -> nn.Module:
    from .torch_int8 import convert

    bounds = {name: float(bound.max()) for name, bound in _activation_bounds(work, work.config, scaled=False).items()}
    modules = dict(work.named_modules())
    groups = {name: DOWN_GROUPS if modules[name].in_features % DOWN_GROUPS == 0 else 1 for name in bounds}
    alphas = {name: QKV_ALPHA for name, _ in work.named_modules() if name.endswith(".attention.self.query")} \
        if alpha == DYNAMIC_ALPHA else {}
    return convert(work, stats, alpha, bounds, groups=groups, alphas=alphas).eval()


def _per_token_session(work: nn.Module, config, path: str | None) -> OnnxRuntimeModel:
    import onnx

    from .onnx_export import export_onnx
    from .per_token import per_token_int8

    with tempfile.TemporaryDirectory(prefix="bertkit-int8-") as folder:  # gone on success and on failure
        export_onnx(work, os.path.join(folder, "float.onnx"))
        graph = onnx.load(os.path.join(folder, "float.onnx"))
    bounds = _activation_bounds(work, config)
    if not per_token_int8(graph, lambda node_name: bounds.get(_module_name(node_name))):
        raise RuntimeError("the exported graph has no MatMul by a constant weight to quantize")
    if path is not None:
        onnx.save(graph, path)
    return OnnxRuntimeModel(graph.SerializeToString(), config).eval()


def quantize_dynamic_int8(model: nn.Module, calibration: Iterable[Mapping[str, torch.Tensor]] | None = None,
                          alpha: float = DEFAULT_ALPHA, smoothed: bool = False) -> nn.Module:
    """``torch.ao.quantization.quantize_dynamic`` (per-channel int8 weights) on a copy of ``model``.

    The result is the same class with the same ``forward``. Without ``calibration`` no smoothing is
    possible and accuracy drops on models with outlier features (cosine 0.96 instead of 0.995 on
    all-MiniLM-L6-v2, see docs/benchmarks.md).
    """
    work = model if smoothed else copy.deepcopy(model).float().eval()
    if calibration is not None and alpha > 0 and not smoothed:
        calibration = list(calibration)
        smooth(work, input_channel_amax(work, calibration), alpha)
    qconfig = torch.ao.quantization.per_channel_dynamic_qconfig
    with warnings.catch_warnings():
        # torch 2.13 announces that quantized tensors (qint8) will be removed in a future release; this
        # backend will go with them (the onnxruntime one does not depend on them).
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
        warnings.filterwarnings("ignore", message=".*torch.ao.quantization is deprecated.*")
        return torch.ao.quantization.quantize_dynamic(work, {nn.Linear: qconfig}, inplace=True).eval()
