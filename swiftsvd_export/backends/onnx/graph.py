"""Graph checks: each factorized linear is exactly two MatMuls with the factor shapes.

The checks read the weight operand of every MatMul-family node:

- ``MatMul`` / ``FusedMatMul`` / ``MatMulInteger`` / ``MatMulIntegerToFloat`` /
  ``DynamicQuantizeMatMul``: the initializer on input 1 (through ``Cast`` /
  ``DequantizeLinear`` / ``Transpose`` where a graph inserts one), shape (K, N);
- ``MatMulNBits``: the ``K`` and ``N`` attributes (the weight is packed);
- ``Gemm``: input 1, transposed when ``transB`` is set.

A factorized linear ``W ≈ B·A`` (A: k x in, B: out x k) must appear as one node of shape
(in, k) under ``<module>/A/`` and one of shape (k, out) under ``<module>/B/``, with nothing of
shape (in, out) under the module (that would be a re-densified weight). With ``--stack-a``
(``stack.py``) the A factors of linears reading one input are a single node of shape
(in, k_1 + k_2 + ...) under ``<parent>/stacked_A/<m1>+<m2>+.../``, split by their ranks: it counts
as each member's A. The same check runs on the model onnxruntime writes after ``ORT_ENABLE_ALL``
optimization, so a fusion that merged the pair would be caught.
"""
from __future__ import annotations

import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import onnx
from onnx import numpy_helper

MATMUL_OPS = {"MatMul", "FusedMatMul", "MatMulInteger", "MatMulIntegerToFloat",
              "DynamicQuantizeMatMul", "MatMulNBits", "Gemm"}
_PASS_THROUGH = {"Cast", "DequantizeLinear", "Identity"}

STACK_SCOPE = "stacked_A"  # node scope of A factors stacked by stack.py

DTYPE_NAMES = {onnx.TensorProto.FLOAT: "fp32", onnx.TensorProto.FLOAT16: "fp16",
               onnx.TensorProto.BFLOAT16: "bf16", onnx.TensorProto.INT8: "int8",
               onnx.TensorProto.UINT8: "uint8", onnx.TensorProto.INT64: "int64",
               onnx.TensorProto.INT32: "int32", onnx.TensorProto.BOOL: "bool"}


@dataclass
class WeightInfo:
    node: str
    op: str
    shape: tuple[int, int] | None      # (K, N) as the MatMul sees it
    dtype: str | None                  # storage type of the weight ("int4" for MatMulNBits)
    initializer: str | None


@dataclass
class PairReport:
    ok: bool
    n_factorized: int
    n_pairs_found: int
    problems: list[str] = field(default_factory=list)
    weight_dtypes: dict[str, int] = field(default_factory=dict)
    op_counts: dict[str, int] = field(default_factory=dict)
    matmul_nodes: int = 0

    def to_dict(self) -> dict:
        return {"ok": self.ok, "factorized_linears": self.n_factorized,
                "pairs_found": self.n_pairs_found, "problems": self.problems[:20],
                "factor_weight_dtypes": self.weight_dtypes, "matmul_family_nodes": self.matmul_nodes,
                "op_counts": self.op_counts}


def onnx_prefix(module_name: str) -> str:
    """``model.layers.0.self_attn.q_proj`` -> ``/model/layers.0/self_attn/q_proj/`` (torch's node scope)."""
    parts: list[str] = []
    for p in module_name.split("."):
        if p.isdigit() and parts:
            parts[-1] += "." + p
        else:
            parts.append(p)
    return "/" + "/".join(parts) + "/"


def matmul_weights(model: onnx.ModelProto) -> list[WeightInfo]:
    """The constant weight operand of every MatMul-family node."""
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    out = []
    for n in g.node:
        if n.op_type not in MATMUL_OPS:
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        if n.op_type == "MatMulNBits":
            bits = int(attrs.get("bits", 4))
            out.append(WeightInfo(n.name, n.op_type, (int(attrs["K"]), int(attrs["N"])),
                                  f"int{bits}", n.input[1]))
            continue
        name, transposed = n.input[1], False
        for _ in range(4):  # follow Cast / DequantizeLinear / Transpose back to an initializer
            if name in inits or name not in producer:
                break
            p = producer[name]
            if p.op_type in _PASS_THROUGH:
                name = p.input[0]
            elif p.op_type == "Transpose":
                name, transposed = p.input[0], not transposed
            else:
                break
        init = inits.get(name)
        if init is None or len(init.dims) != 2:
            out.append(WeightInfo(n.name, n.op_type, None, None, None))
            continue
        shape = (int(init.dims[0]), int(init.dims[1]))
        if n.op_type in ("Gemm", "FusedMatMul") and attrs.get("transB", 0):
            transposed = not transposed
        if transposed:
            shape = (shape[1], shape[0])
        out.append(WeightInfo(n.name, n.op_type, shape, DTYPE_NAMES.get(init.data_type, str(init.data_type)),
                              name))
    return out


def stacked_members(node: str) -> tuple[str, list[str]] | None:
    """(parent scope, the members' short module names) of a stacked A node or its Split, else None."""
    i = node.find(f"/{STACK_SCOPE}/")
    if i < 0:
        return None
    return node[:i + 1], node[i + len(STACK_SCOPE) + 2:].split("/", 1)[0].split("+")


def stack_scope(parent: str, members: list[str]) -> str:
    """The node scope of the stacked A (and its Split) of ``members`` under ``parent``."""
    return f"{parent}{STACK_SCOPE}/{'+'.join(members)}/"


def stack_splits(model: onnx.ModelProto) -> dict[str, list[int]]:
    """The sizes of every stacked A's Split (its constant ``split`` input), by ``stack_scope``."""
    inits = {i.name: i for i in model.graph.initializer}
    return {stack_scope(*m): [int(v) for v in numpy_helper.to_array(inits[n.input[1]])]
            for n in model.graph.node
            if n.op_type == "Split" and (m := stacked_members(n.name)) and len(n.input) > 1 and n.input[1] in inits}


def a_factor(weights: list[WeightInfo], name: str, factors: dict[str, tuple[int, int, int]],
             splits: dict[str, list[int]]) -> tuple[list[WeightInfo], tuple[int, int], str]:
    """(the A node(s) found for linear ``name``, the shape its A must have, a problem or ""): its own
    ``<module>/A/`` node, or the stacked node that lists it, whose Split (``splits``, from
    ``stack_splits``) must give every member its rank."""
    fin, _, k = factors[name]
    prefix = onnx_prefix(name)
    own = [w for w in weights if f"{prefix}A/" in w.node]
    if own:
        return own, (fin, k), ""
    parent, short = prefix[:-1].rsplit("/", 1)
    stacked = [w for w in weights if (m := stacked_members(w.node)) and m[0] == parent + "/" and short in m[1]]
    if len(stacked) != 1:
        return stacked, (fin, k), ""
    members = stacked_members(stacked[0].node)
    module = name.rsplit(".", 1)[0]
    ranks = [factors.get(f"{module}.{m}", (0, 0, 0))[2] for m in members[1]]
    sizes = splits.get(stack_scope(*members))
    problem = "" if sizes == ranks else f"{name}: stacked A split {sizes}, expected the ranks {ranks}"
    return stacked, (fin, sum(ranks)), problem


def check_pairs(model: onnx.ModelProto | str | Path, factors: dict[str, tuple[int, int, int]],
                names: set[str] | None = None) -> PairReport:
    """Check every factorized linear (or those in ``names``). ``factors`` maps module name ->
    (in_features, out_features, rank)."""
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    weights = matmul_weights(model)
    splits = stack_splits(model)
    problems: list[str] = []
    dtypes: Counter = Counter()
    found = 0
    for name, (fin, fout, k) in sorted(factors.items()):
        if names is not None and name not in names:
            continue
        prefix = onnx_prefix(name)
        mine = [w for w in weights if prefix in w.node]
        a, a_shape, a_problem = a_factor(weights, name, factors, splits)
        b = [w for w in mine if f"{prefix}B/" in w.node]
        dense = [w for w in mine if w.shape == (fin, fout)]
        ok = not a_problem
        if a_problem:
            problems.append(a_problem)
        if len(a) != 1 or a[0].shape != a_shape:
            problems.append(f"{name}: A factor: expected one MatMul of shape {a_shape}, "
                            f"found {[(w.op, w.shape) for w in a]}")
            ok = False
        if len(b) != 1 or b[0].shape != (k, fout):
            problems.append(f"{name}: B factor: expected one MatMul of shape {(k, fout)}, "
                            f"found {[(w.op, w.shape) for w in b]}")
            ok = False
        if dense:
            problems.append(f"{name}: re-densified weight of shape {(fin, fout)} found")
            ok = False
        n_nodes = len(mine) + (1 if a and a[0] not in mine else 0)  # a stacked A is not under the module
        if n_nodes != 2:
            problems.append(f"{name}: expected exactly 2 MatMul-family nodes, found {n_nodes}")
            ok = False
        if ok:
            found += 1
            for w in a + b:
                dtypes[w.dtype or "?"] += 1
    counts = Counter(n.op_type for n in model.graph.node)
    return PairReport(ok=not problems, n_factorized=len(factors if names is None else names), n_pairs_found=found,
                      problems=problems,
                      weight_dtypes=dict(dtypes), op_counts=dict(counts.most_common()),
                      matmul_nodes=sum(v for k, v in counts.items() if k in MATMUL_OPS))


def shape_counts(model: onnx.ModelProto, factors: dict[str, tuple[int, int, int]]) -> dict[str, int]:
    """Name-free cross-check: how many MatMul-family weights have each factor shape, against the ranks."""
    expected: Counter = Counter()
    for fin, fout, k in factors.values():
        expected[(fin, k)] += 1
        expected[(k, fout)] += 1
    weights = matmul_weights(model)
    by_prefix = {onnx_prefix(n): f for n, f in factors.items()}
    for w in weights:  # a stacked A stands for its members' A's
        if (m := stacked_members(w.node)) and all(f"{m[0]}{s}/" in by_prefix for s in m[1]):
            members = [by_prefix[f"{m[0]}{s}/"] for s in m[1]]
            expected.subtract((fin, k) for fin, _, k in members)
            expected[(members[0][0], sum(k for _, _, k in members))] += 1
    expected = +expected
    have = Counter(w.shape for w in weights if w.shape in expected)
    return {"expected": sum(expected.values()),
            "found": sum(min(have[s], c) for s, c in expected.items()),
            "missing_shapes": sorted(f"{s[0]}x{s[1]}" for s, c in expected.items() if have[s] < c)}


def ort_optimized(model_path: str | Path, out_path: str | Path | None = None, threads: int = 1) -> onnx.ModelProto:
    """The graph onnxruntime actually runs after ORT_ENABLE_ALL on CPU (written and reloaded)."""
    import onnxruntime as ort

    from .runtime import session_options

    tmpdir = None
    if out_path is None:
        tmpdir = tempfile.TemporaryDirectory(prefix="swiftsvd-ortopt-")
        out_path = Path(tmpdir.name) / "optimized.onnx"
    so = session_options(threads, "all")
    so.optimized_model_filepath = str(out_path)
    so.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                Path(out_path).name + ".data")
    so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes",
                                "1024")
    ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])
    model = onnx.load(str(out_path), load_external_data=False)
    if tmpdir is not None:
        tmpdir.cleanup()
    return model


def initializer_bytes(model: onnx.ModelProto, directory: Path | None = None) -> dict[str, int]:
    """Bytes of initializers by storage dtype (external data counted from the tensor's metadata)."""
    import numpy as np

    by: Counter = Counter()
    for init in model.graph.initializer:
        n = int(np.prod(init.dims)) if init.dims else 1
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(init.data_type).itemsize
        by[DTYPE_NAMES.get(init.data_type, str(init.data_type))] += n * itemsize
    return dict(by)
