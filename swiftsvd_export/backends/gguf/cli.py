"""CLI glue for the GGUF target: ``export --target gguf`` and ``generate --target gguf``."""
from __future__ import annotations

FACTOR_TYPES = ("f32", "f16", "q8_0", "q4_0")
EMBED_TYPES = ("f32", "f16", "q8_0")
# layouts of the shared --kv-cache flag (commands/export.py) that this target implements (writer.KV_LAYOUTS)
KV_CACHE_LAYOUTS = ("dense", "latent-v", "latent-kv")


def add_export_arguments(group) -> None:
    group.add_argument("--factor-type", choices=FACTOR_TYPES, default="f16",
                       help="GGUF type of the low-rank factors and dense block weights (default f16)")
    group.add_argument("--a-type", choices=FACTOR_TYPES, default=None,
                       help="GGUF type of the A factors (default: --factor-type); e.g. q8_0 with --factor-type "
                            "q4_0 keeps the more sensitive factor at 8 bits")
    group.add_argument("--embed-type", choices=EMBED_TYPES, default="f16",
                       help="GGUF type of the token embeddings / output head (default f16)")


def run_export(args) -> int:
    from .writer import export_gguf

    import logging

    logging.getLogger("gguf").setLevel(logging.WARNING)
    from ...channel_importance import calibration_text

    export_gguf(args.model_dir, args.output, factor_type=args.factor_type,
                embed_type=args.embed_type, overwrite=args.overwrite, kv_cache=args.kv_cache, a_type=args.a_type,
                imatrix_calib=calibration_text(args.imatrix_calib, not args.no_imatrix),
                imatrix_samples=args.imatrix_samples)
    return 0


def add_generate_arguments(group) -> None:
    group.add_argument("--gguf-ctx", type=int, default=2048,
                       help="llama.cpp context size for the GGUF target (default 2048)")
    group.add_argument("--gguf-chat", action="store_true",
                       help="wrap the prompt in the GGUF's chat template (a user turn)")


def run_generate(args) -> int:
    from .runtime import generate_cli

    return generate_cli(args)
