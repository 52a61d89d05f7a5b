"""The int8 graph of ``model.backend: onnx-int8``: per-token activations, per-channel
weights, LayerNorm outliers smoothed.

Why not ONNX Runtime's ``quantize_dynamic``: it gives a MatMul's whole input ONE
scale per batch, so one token with large activations coarsens every other token of
the batch (and a row's vector depends on its batch neighbours). On all-MiniLM-L6-v2
and the 240 canary texts every MatMul in that form put the worst text at cosine
0.964 to fp32; keeping the down projections and the edge layers in fp32 reached
0.980 but ran at 1.3x fp32, not 2x. This graph (bench/encode.py, docs/performance.md):

1. **Smoothing** (SmoothQuant, Xiao et al. 2023, only shrinking): a LayerNorm's output
   carries a few channels far above the rest (BERT's outlier dimensions). Where a
   weight MatMul reads a LayerNormalization's output, channel c is divided by
   ``s_c = 2 ** round(log2(max(1, amax_c / median(amax)) ** ALPHA))`` (one Mul node)
   and the weights' row c multiplied by it: the product is unchanged, the input's
   range narrower. ``amax`` comes from the fp32 graph on the fixed CALIBRATION
   texts; powers of two make the rescaling exact and keep a CPU's last-bit float
   differences in the calibration from changing the file.
2. **Per-token int8**: every weight MatMul ``X @ W`` becomes X as rows [N, C], each
   row quantized with its own scale ``max|x| / 127`` (QuantizeLinear per axis, zero
   point 128: uint8, ONNX Runtime's fast u8 x s8 kernels), times W quantized per
   output column (symmetric int8) in ``MatMulIntegerToFloat``, times the row scale.
   A row's vector no longer depends on the other rows of its batch.

Deterministic: the same model, calibration texts and libraries give the same bytes.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

CALIBRATION_FILE = Path(__file__).resolve().parents[1] / "data" / "calibration.jsonl"
ALPHA = 0.5  # measured on MiniLM's canary: 0.5 min cos 0.993, 0.75 0.992, 1.0 0.992
SMOOTHED_PRODUCERS = ("LayerNormalization",)
_MS = "com.microsoft"


def calibration_texts() -> list[str]:
    """124 standard-library docstrings, fixed in the package (none is a canary text)."""
    lines = CALIBRATION_FILE.read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["text"] for line in lines if line.strip()]


def weight_matmuls(graph: Any) -> list[Any]:
    """The MatMul nodes whose second input is a 2-D weight (an initializer): the ones
    the rewrite makes int8."""
    weights = _weight_names(graph)
    return [n for n in graph.node if _is_weight_matmul(n, weights)]


def _weight_names(graph: Any) -> set[str]:
    return {w.name for w in graph.initializer if len(w.dims) == 2}


def _is_weight_matmul(node: Any, weights: set[str]) -> bool:
    return node.op_type == "MatMul" and len(node.input) > 1 and node.input[1] in weights


def activation_ranges(model: Any, feeds: Iterable[dict[str, np.ndarray]],
                      names: list[str]) -> dict[str, np.ndarray]:
    """Per channel, the largest |value| of each tensor ``names`` over the feeds' real
    tokens (their attention_mask), from the fp32 graph on one thread."""
    import onnx
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None)
                              for n in names)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(probe.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    amax: dict[str, np.ndarray] = {}
    for feed in feeds:
        real = feed["attention_mask"].astype(bool)
        for name, value in zip(names, session.run(names, feed), strict=True):
            found = np.abs(value[real] if value.ndim == 3 else value).max(axis=0)
            amax[name] = np.maximum(amax[name], found) if name in amax else found
    return amax


def smoothing_scales(amax: np.ndarray) -> np.ndarray:
    """Powers of two >= 1, large only for the outlier channels."""
    ratio = np.maximum(amax / max(float(np.median(amax)), 1e-12), 1.0) ** ALPHA
    return np.exp2(np.round(np.log2(ratio))).astype(np.float32)


def quantize(model: Any, feeds: Iterable[dict[str, np.ndarray]]) -> Any:
    """The int8 graph of the fp32 ``model`` (an onnx ModelProto, changed in place)."""
    graph = model.graph
    producers = {out: node.op_type for node in graph.node for out in node.output}
    smoothed = sorted({n.input[0] for n in weight_matmuls(graph)
                       if producers.get(n.input[0]) in SMOOTHED_PRODUCERS})
    amax = activation_ranges(model, feeds, smoothed) if smoothed else {}
    rewriter = _Rewriter(graph, {name: smoothing_scales(a) for name, a in amax.items()})
    rewriter.run()
    if not any(o.domain == _MS for o in model.opset_import):
        model.opset_import.append(_helper().make_opsetid(_MS, 1))
    log.info("int8: %d MatMuls per token, %d inputs smoothed", rewriter.count, len(amax))
    return model


def _helper() -> Any:
    import onnx

    return onnx.helper


class _Rewriter:
    """Replaces each weight MatMul by its per-token int8 form; the quantization of an
    input several MatMuls read (Q, K and V) is made once."""

    def __init__(self, graph: Any, scales: dict[str, np.ndarray]):
        self.graph = graph
        self.scales = scales
        self.weights = {w.name: w for w in graph.initializer}
        self.quantized: dict[str, str] = {}  # input -> its quantized rows' prefix
        self.count = 0

    def run(self) -> None:
        weights = _weight_names(self.graph)
        self._constants()
        out: list[Any] = []
        for node in list(self.graph.node):
            out += self._replace(node) if _is_weight_matmul(node, weights) else [node]
        del self.graph.node[:]
        self.graph.node.extend(out)
        used = {name for node in out for name in node.input}
        kept = [w for w in self.graph.initializer if w.name in used]  # the fp32 weights go
        del self.graph.initializer[:]
        self.graph.initializer.extend(kept)

    def _init(self, name: str, value: np.ndarray) -> str:
        from onnx import numpy_helper

        self.graph.initializer.append(numpy_helper.from_array(value, name))
        return name

    def _constants(self) -> None:
        self._init("i8_one", np.array([1.0], np.float32))
        self._init("i8_eps", np.array(1e-12, np.float32))
        self._init("i8_inv127", np.array(1 / 127, np.float32))
        self._init("i8_zp", np.array(128, np.uint8))
        self._init("i8_axis1", np.array([1], np.int64))
        self._init("i8_first", np.array([0], np.int64))
        self._init("i8_last", np.array([-1], np.int64))

    def _replace(self, node: Any) -> list[Any]:
        from onnx import numpy_helper

        make = _helper().make_node
        x, y, p = node.input[0], node.output[0], f"i8_{self.count}"
        self.count += 1
        weight = numpy_helper.to_array(self.weights[node.input[1]]).astype(np.float32)
        nodes: list[Any] = []
        if x not in self.quantized:
            nodes += self._quantize_rows(x, p, weight.shape[0])
        q = self.quantized[x]
        if x in self.scales:
            weight = weight * self.scales[x][:, None]
        step = np.maximum(np.abs(weight).max(axis=0), 1e-12) / 127
        wq = np.clip(np.round(weight / step), -127, 127).astype(np.int8)
        self._init(f"{p}_wq", wq)
        self._init(f"{p}_ws", step.astype(np.float32))
        self._init(f"{p}_wzp", np.zeros(weight.shape[1], np.int8))
        self._init(f"{p}_cols", np.array([weight.shape[1]], np.int64))
        return nodes + [
            make("MatMulIntegerToFloat", [f"{q}_q", f"{p}_wq", "i8_one", f"{p}_ws", "i8_zp",
                                          f"{p}_wzp"], [f"{p}_raw"], domain=_MS,
                 name=f"{node.name}_int8"),
            make("Mul", [f"{p}_raw", f"{q}_scale_col"], [f"{p}_rows"]),
            make("Concat", [f"{q}_lead", f"{p}_cols"], [f"{p}_shape"], axis=0),
            make("Reshape", [f"{p}_rows", f"{p}_shape"], [y]),
        ]

    def _quantize_rows(self, x: str, p: str, width: int) -> list[Any]:
        """Nodes that make ``x`` rows [N, C] of uint8 with a scale per row."""
        make = _helper().make_node
        q = self.quantized[x] = f"{p}_in"
        self._init(f"{q}_width", np.array([-1, width], np.int64))
        src, nodes = x, []
        if x in self.scales:  # divide the outlier channels (powers of two: exact)
            self._init(f"{q}_inv", (1.0 / self.scales[x]).astype(np.float32))
            nodes.append(make("Mul", [x, f"{q}_inv"], [f"{q}_smooth"]))
            src = f"{q}_smooth"
        return nodes + [
            make("Shape", [x], [f"{q}_shape"]),
            make("Slice", [f"{q}_shape", "i8_first", "i8_last"], [f"{q}_lead"]),
            make("Reshape", [src, f"{q}_width"], [f"{q}_2d"]),
            make("Abs", [f"{q}_2d"], [f"{q}_abs"]),
            make("ReduceMax", [f"{q}_abs", "i8_axis1"], [f"{q}_max"], keepdims=0),
            make("Max", [f"{q}_max", "i8_eps"], [f"{q}_maxe"]),
            make("Mul", [f"{q}_maxe", "i8_inv127"], [f"{q}_scale"]),
            make("Shape", [f"{q}_scale"], [f"{q}_n"]),
            make("Expand", ["i8_zp", f"{q}_n"], [f"{q}_zps"]),
            make("QuantizeLinear", [f"{q}_2d", f"{q}_scale", f"{q}_zps"], [f"{q}_q"], axis=0),
            make("Unsqueeze", [f"{q}_scale", "i8_last"], [f"{q}_scale_col"]),
        ]
