"""ONNX target: low-rank models as paired-MatMul decoder graphs with a KV cache.

Each factorized linear is exported as two MatMuls (x·Aᵀ then ·Bᵀ); it is never re-densified.
The graph is written by optimum's exporter (task ``text-generation-with-past``) so that
``optimum.onnxruntime.ORTModelForCausalLM`` loads it with no custom code, and the project's
own loop (``runtime.py``) runs it with plain onnxruntime.
"""
