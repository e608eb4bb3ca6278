"""Runtime targets: each subpackage lowers a model folder and runs the result."""
