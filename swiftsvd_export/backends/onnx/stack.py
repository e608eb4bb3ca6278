"""Stack the A factors of linears that read the same input into one MatMul (``--stack-a``).

q/k/v (and gate/up) each start with a thin MatMul x·A_iᵀ of the same x. One MatMul by the
concatenated [A_qᵀ | A_kᵀ | A_vᵀ] and a Split by the ranks give the same latents with one wide
kernel instead of three thin ones, which onnxruntime runs faster with 2 threads (README,
"Stacked A factors"); the patched llama.cpp's GGUF stacks them the same way. Every linear is
still B·(A·x), never re-densified: the graph check reads the stacked node as each member's A
(``graph.stacked_members``) and the Split's sizes as their ranks.
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .graph import stack_scope


def stack_a_factors(model: onnx.ModelProto) -> int:
    """Rewrite ``model`` (fp32, as exported) in place; returns how many groups were stacked.

    An A factor is a MatMul named ``<parent>/<linear>/A/...`` with a 2-D initializer weight; those
    of one parent scope reading the same tensor form a group."""
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    groups: dict[tuple[str, str], list[onnx.NodeProto]] = defaultdict(list)
    for n in g.node:
        i = n.name.find("/A/")
        if n.op_type == "MatMul" and i > 0 and n.input[1] in inits and len(inits[n.input[1]].dims) == 2:
            groups[(n.name[:n.name.rfind("/", 0, i) + 1], n.input[0])].append(n)
    replace: dict[int, list[onnx.NodeProto]] = {}
    removed: set[int] = set()
    old_weights: set[str] = set()
    for (parent, x), members in groups.items():
        weights = [numpy_helper.to_array(inits[n.input[1]]) for n in members]
        if len(members) < 2 or len({w.shape[0] for w in weights}) != 1:
            continue
        shorts = [n.name[len(parent):].split("/", 1)[0] for n in members]
        scope = stack_scope(parent, shorts)
        w = numpy_helper.from_array(np.concatenate(weights, axis=1), scope + "weight")
        sizes = numpy_helper.from_array(np.asarray([a.shape[1] for a in weights], dtype=np.int64), scope + "split")
        g.initializer.extend([w, sizes])
        mm = helper.make_node("MatMul", [x, w.name], [scope + "output_0"], name=scope + "MatMul")
        split = helper.make_node("Split", [mm.output[0], sizes.name], [n.output[0] for n in members], axis=-1,
                                 name=scope + "Split")
        replace[id(members[0])] = [mm, split]  # where the first member was: x exists, no consumer yet
        removed.update(id(n) for n in members)
        old_weights.update(n.input[1] for n in members)
    if not replace:
        return 0
    nodes = [m for n in g.node for m in (replace.get(id(n)) or ([] if id(n) in removed else [n]))]
    del g.node[:]
    g.node.extend(nodes)
    used = {i for n in g.node for i in n.input}
    keep = [i for i in g.initializer if i.name in used or i.name not in old_weights]
    del g.initializer[:]
    g.initializer.extend(keep)
    return len(replace)
