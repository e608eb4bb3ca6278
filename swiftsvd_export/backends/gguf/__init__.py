"""GGUF target: low-rank tensor pairs run by a patched llama.cpp (see targets/llamacpp/README.md)."""
