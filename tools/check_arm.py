#!/usr/bin/env python3
"""Check the patched llama.cpp on aarch64 (cross-built, run under qemu-user) against x86 (not a test).

Phones run ggml-cpu's ARM kernels, which repack Q4_0 and Q8_0 weights (q4_0_4x8 / q8_0_4x8 with
i8mm, 4x4 with dotprod only) and read their input rows as if contiguous: the case where the patch
has to make each B factor's view of the stacked A·x contiguous over a prompt (it broke V on x86;
targets/llamacpp/README.md, "Why stacked"). This checks the ARM side, without a phone:

1. cross-builds the patched libllama for each ``--arm-arch`` (``swiftsvd-export build-llamacpp
   --arm-arch MARCH``; cached beside the native build, keyed by the patches and options: ~3 min for the
   first on 2 cores, under a minute for the next with ccache);
2. builds ``tools/llamacpp_logits.cpp`` for x86 (against the native patched build) and for each
   aarch64 build;
3. writes GGUFs of a tiny random Llama whose every q/k/v/o/gate/up/down is factorized with ranks that
   repack (multiples of 32): factors F32, Q8_0, Q4_0, Q4_0 B's with Q8_0 A's; KV cache dense,
   latent-v, latent-kv; and the dense model at Q4_0 and F32;
4. runs each file on x86 and under ``qemu-aarch64 -cpu max`` (1 and 2 threads, flash attention off
   and on) and compares the logits of every position (prompt, batch of 7, single tokens).

A file passes when F32 stays within ``--f32-tol`` (0.05) of x86, a quantized file within ``--q-tol``
(1.0; different integer kernels flip an occasional Q8_0 activation rounding, worth ~0.1-0.5 logits
on this model) with every top-1 disagreement at a position where x86's own top-2 margin is smaller
than that position's difference, and when ARM repacked the quantized file's weights. With
``--negative-control`` it also builds the patch without its ``ggml_cont`` (B reads the strided view
directly) and requires the check to fail there, so a pass is known to mean something.
``tests/test_arm.py`` runs the check (2 threads, both architectures) in the test suite.

    apt-get install -y qemu-user g++-aarch64-linux-gnu     # Debian/Ubuntu
    python tools/check_arm.py --json bench_out/arm.json [--negative-control]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
HARNESS = ROOT / "tools" / "llamacpp_logits.cpp"
ARCHS = ["armv8.2-a+dotprod+i8mm", "armv8.2-a+dotprod"]
PHASES = ("prompt", "batch7", "single")
CONT_LINE = "+    return ax->ne[1] > 1 ? ggml_cont(ctx0, rows) : rows;\n"
RANKS = {"self_attn.q_proj": 64, "self_attn.k_proj": 32, "self_attn.v_proj": 64, "self_attn.o_proj": 64,
         "mlp.gate_proj": 96, "mlp.up_proj": 96, "mlp.down_proj": 64}
FILES = {  # name -> (model, export_gguf options)
    "lr-f32-dense": ("lowrank", dict(factor_type="f32", embed_type="f32", kv_cache="dense")),
    "lr-f32-latent-v": ("lowrank", dict(factor_type="f32", embed_type="f32", kv_cache="latent-v")),
    "lr-q8_0-dense": ("lowrank", dict(factor_type="q8_0", embed_type="q8_0", kv_cache="dense")),
    "lr-q8_0-latent-v": ("lowrank", dict(factor_type="q8_0", embed_type="q8_0", kv_cache="latent-v")),
    "lr-q4_0-dense": ("lowrank", dict(factor_type="q4_0", embed_type="q8_0", kv_cache="dense")),
    "lr-q4_0-latent-v": ("lowrank", dict(factor_type="q4_0", embed_type="q8_0", kv_cache="latent-v")),
    "lr-q4_0-latent-kv": ("lowrank", dict(factor_type="q4_0", embed_type="q8_0", kv_cache="latent-kv")),
    "lr-q4_0-a-q8_0-dense": ("lowrank", dict(factor_type="q4_0", a_type="q8_0", embed_type="q8_0", kv_cache="dense")),
    "dense-f32": ("dense", dict(factor_type="f32", embed_type="f32")),
    "dense-q4_0": ("dense", dict(factor_type="q4_0", embed_type="q8_0")),
}


def need_tools() -> None:
    missing = [t for t in ("qemu-aarch64", "aarch64-linux-gnu-g++", "g++", "cmake") if not shutil.which(t)]
    if missing:
        raise SystemExit(f"check_arm: {', '.join(missing)} not found; install them "
                         "(apt-get install -y qemu-user g++-aarch64-linux-gnu g++ cmake)")


def make_ggufs(out: Path) -> dict[str, Path]:
    """The tiny model (hidden 256, 4 heads of 64, 2 KV heads, intermediate 512, 2 layers, vocab 512;
    untied output scaled ×4 so that top-1 is not the input token everywhere) as GGUF files."""
    import torch
    from transformers import LlamaConfig

    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import lowrank_llama, make_tokenizer  # the tests' tiny models

    from swiftsvd_export.backends.gguf.writer import export_gguf
    from swiftsvd_export.lowrank import save_lowrank

    torch.set_num_threads(1)
    src = out / "models"
    tok = make_tokenizer(src / "tokenizer")
    cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=2, rms_norm_eps=1e-5)
    for which, ranks in (("dense", {}), ("lowrank", RANKS)):
        torch.manual_seed(0)
        model = lowrank_llama(cfg, ranks, std=0.06)
        with torch.no_grad():
            model.lm_head.weight.mul_(4.0)
        if which == "dense":
            model.save_pretrained(src / which, safe_serialization=True)
            tok.save_pretrained(src / which)
        else:
            save_lowrank(model, src / which, dtype="fp32", tokenizer=tok)
    files = {}
    for name, (which, kw) in FILES.items():
        files[name] = out / f"{name}.gguf"
        export_gguf(src / which, files[name], overwrite=True, quiet=True, **kw)
    return files


def compile_harness(compiler: str, include: list[Path], libs: Path, out: Path) -> Path:
    cmd = [compiler, "-O2", "-std=c++17", *[f"-I{d}" for d in include], str(HARNESS), f"-L{libs}",
           "-l:libllama.so", "-l:libggml.so", "-l:libggml-base.so", f"-Wl,-rpath,{libs}", "-o", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"check_arm: {' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    return out


def run(harness: list[str], gguf: Path, out: Path, threads: int, fa: int) -> dict:
    """One harness run: logits written to ``out``; the weights llama.cpp repacked, from its log."""
    env = dict(os.environ, OMP_WAIT_POLICY="passive")  # spinning threads crawl under emulation
    t0 = time.time()
    proc = subprocess.run([*harness, str(gguf), str(out), str(threads), str(fa)], capture_output=True, text=True,
                          env=env, timeout=900)
    if proc.returncode:
        raise SystemExit(f"check_arm: {' '.join(harness)} {gguf.name} failed (exit {proc.returncode}):\n"
                         f"{proc.stderr[-2000:]}")
    kinds = Counter(re.findall(r"repack tensor \S+ with (\S+)", proc.stderr))
    return {"seconds": round(time.time() - t0, 1), "repacked": dict(kinds)}


def load_logits(p: Path) -> tuple[np.ndarray, np.ndarray]:
    b = p.read_bytes()
    n_rows, n_vocab = np.frombuffer(b, np.int32, 2)
    phase = np.frombuffer(b, np.int32, n_rows, 8)
    return phase, np.frombuffer(b, np.float32, n_rows * n_vocab, 8 + 4 * n_rows).reshape(n_rows, n_vocab)


def compare(ref: Path, test: Path, tol: float) -> dict:
    """Max |Δlogit| per phase (ok up to ``tol``); top-1 disagreements, each with x86's own top-2 margin
    at that position (ok only where the margin is below the difference there)."""
    phase, a = load_logits(ref)
    phase_b, b = load_logits(test)
    if not (phase == phase_b).all() or a.shape != b.shape:
        return {"ok": False, "why": "different shapes"}
    d = np.abs(a.astype(np.float64) - b)
    top2 = np.sort(a, 1)[:, -2:]
    bad = np.nonzero(a.argmax(1) != b.argmax(1))[0]
    flips = [{"position": int(i), "phase": PHASES[phase[i]], "x86_margin": float(top2[i, 1] - top2[i, 0]),
              "max_abs_diff": float(d[i].max())} for i in bad]
    ok = bool(d.max() <= tol) and all(f["x86_margin"] < f["max_abs_diff"] for f in flips)
    return {"ok": ok, "max_abs_diff": float(d.max()), "max_abs_logit": float(np.abs(a).max()),
            "max_abs_diff_by_phase": {PHASES[p]: float(d[phase == p].max()) for p in range(3)},
            "top1_agree": {PHASES[p]: f"{int((a[phase == p].argmax(1) == b[phase == p].argmax(1)).sum())}/"
                                      f"{int((phase == p).sum())}" for p in range(3)},
            "top1_flips": flips}


def check_real(label: str, harness: list[str], gguf: Path, x86: list[str], work: Path) -> dict:
    """A real model: ARM against x86 at 2 threads, flash attention off. Many layers amplify each
    flipped activation rounding, so the tolerance is twice what x86 itself moves between flash
    attention off and on (the same model computed another way)."""
    stem = re.sub(r"[^\w.-]+", "_", label)
    ref, alt, out = (work / f"{n}-{gguf.stem}.bin" for n in ("x86", "x86-fa", stem))
    if not ref.is_file():
        run(x86, gguf, ref, 2, 0)
        run(x86, gguf, alt, 2, 1)
    floor = compare(ref, alt, float("inf"))["max_abs_diff"]
    r = run(harness, gguf, out, 2, 0)
    c = compare(ref, out, 2 * floor)
    row = {"build": label, "file": str(gguf), "threads": 2, "flash_attn": 0, **r, **c, "x86_noise_floor": floor,
           "tolerance": 2 * floor}
    print(f"  {label:28} {gguf.name}: max|Δ| {c['max_abs_diff']:.2f} (x86 flash attention on/off: {floor:.2f}) "
          f"top-1 {' '.join(c['top1_agree'].values())} repacked {r['repacked'] or '-'} {'ok' if c['ok'] else 'FAIL'}",
          flush=True)
    return row


def check(label: str, harness: list[str], files: dict[str, Path], ref: dict, work: Path, threads: list[int],
          f32_tol: float, q_tol: float) -> list[dict]:
    rows = []
    stem = re.sub(r"[^\w.-]+", "_", label)
    for name, gguf in files.items():
        quantized = "f32" not in name
        for t in threads:
            for fa in (0, 1):
                out = work / f"{stem}-{name}-t{t}-fa{fa}.bin"
                r = run(harness, gguf, out, t, fa)
                c = compare(ref[(name, t, fa)], out, q_tol if quantized else f32_tol)
                repack_ok = not quantized or sum(r["repacked"].values()) > 0
                row = {"build": label, "file": name, "threads": t, "flash_attn": fa, **r, **c,
                       "ok": c["ok"] and repack_ok}
                if not repack_ok:
                    row["why"] = "no weight was repacked: the ARM kernels under test did not run"
                rows.append(row)
                print(f"  {label:28} {name:22} t{t} fa{fa}: max|Δ| {c.get('max_abs_diff', float('nan')):.2e} "
                      f"top-1 {' '.join(c.get('top1_agree', {}).values())} repacked {r['repacked'] or '-'} "
                      f"{'ok' if row['ok'] else 'FAIL'}", flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="example:\n" + "\n".join(__doc__.splitlines()[-2:]),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arm-arch", nargs="+", default=ARCHS, help=f"GGML_CPU_ARM_ARCH values (default: {' '.join(ARCHS)})")
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--f32-tol", type=float, default=0.05)
    ap.add_argument("--q-tol", type=float, default=1.0)
    ap.add_argument("--gguf", nargs="+", type=Path, default=None, metavar="FILE",
                    help="also real GGUFs (e.g. a release's phone artifact): ARM against x86 at 2 threads, within "
                         "twice what x86 moves between flash attention off and on (minutes each under qemu)")
    ap.add_argument("--negative-control", action="store_true",
                    help="also build the patch without its ggml_cont (first --arm-arch) and require a failure")
    ap.add_argument("--work", type=Path, default=None,
                    help="keep GGUFs, harnesses and logits here (default: a temp dir, removed at the end)")
    ap.add_argument("--json", type=Path, default=Path("check_arm.json"))
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    need_tools()
    for g in a.gguf or []:
        if not g.is_file():
            raise SystemExit(f"check_arm: {g}: no such GGUF file")
    work = a.work or Path(tempfile.mkdtemp(prefix="check_arm-"))
    try:
        return check_all(a, work)
    finally:
        if a.work is None:
            shutil.rmtree(work, ignore_errors=True)


def check_all(a: argparse.Namespace, work: Path) -> int:
    from swiftsvd_export.backends.gguf import build

    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    native = build.build_libs()
    libs = {arch: build.build_libs(native=False, arm_arch=arch) for arch in a.arm_arch}
    controls = {}
    if a.negative_control:
        patches = work / "patches-no-cont"
        patches.mkdir(exist_ok=True)
        for p in build.patch_files():
            text = p.read_text()
            if CONT_LINE in text:
                text = text.replace(CONT_LINE, "+    return rows;\n")
            (patches / p.name).write_text(text)
        if all(CONT_LINE not in p.read_text() for p in build.patch_files()):
            raise SystemExit("check_arm: the patch series has no ggml_cont line to remove (it changed?)")
        controls[a.arm_arch[0]] = build.build_libs(native=False, arm_arch=a.arm_arch[0], patches_dir=patches)
    build_s = time.time() - t0

    src = work / "llama.cpp"
    if not (src / "include" / "llama.h").is_file():
        build.extract_vendor(build.fetch_sdist(), src)
    include = [src / "include", src / "ggml" / "include"]
    x86 = [str(compile_harness("g++", include, native, work / "logits-x86"))]
    qemu = ["qemu-aarch64", "-L", "/usr/aarch64-linux-gnu", "-cpu", "max"]
    arm = {arch: [*qemu, str(compile_harness("aarch64-linux-gnu-g++", include, d, work / f"logits-{i}"))]
           for i, (arch, d) in enumerate({**libs, **{f"{k} without ggml_cont": v for k, v in controls.items()}}.items())}

    files = make_ggufs(work)
    ref = {}
    for name, gguf in files.items():
        for t in a.threads:
            for fa in (0, 1):
                ref[(name, t, fa)] = work / f"x86-{name}-t{t}-fa{fa}.bin"
                run(x86, gguf, ref[(name, t, fa)], t, fa)
    rows = []
    for arch, harness in arm.items():
        rows += check(arch, harness, files, ref, work, a.threads, a.f32_tol, a.q_tol)
        rows += [check_real(arch, harness, Path(g), x86, work) for g in (a.gguf or [])]

    checked = [r for r in rows if "without ggml_cont" not in r["build"]]
    control = [r for r in rows if "without ggml_cont" in r["build"]]
    passed = all(r["ok"] for r in checked)
    control_caught = not control or not all(r["ok"] for r in control)
    table = ["| build | file | threads | flash attn | repacked on ARM | max abs logit | max abs Δ (prompt / batch7 / single) "
             "| top-1 agree (prompt / batch7 / single) | ok |", "|" + "---|" * 9]
    for r in rows:
        rp = ", ".join(f"{n} {k}" for k, n in sorted(r["repacked"].items())) or "-"
        by = r.get("max_abs_diff_by_phase", {})
        table.append(f"| {r['build']} | {r['file']} | {r['threads']} | {r['flash_attn']} | {rp} | "
                     f"{r.get('max_abs_logit', float('nan')):.1f} | " + " / ".join(f"{by[p]:.1e}" for p in PHASES) +
                     " | " + " / ".join(r.get("top1_agree", {}).values()) + f" | {'yes' if r['ok'] else 'no'} |")
    print("\n".join(table))
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps({"passed": passed, "negative_control_caught": control_caught if control else None,
                                  "arm_arch": a.arm_arch, "qemu_cpu": "max", "threads": a.threads,
                                  "tolerances": {"f32": a.f32_tol, "quantized": a.q_tol},
                                  "build_seconds": round(build_s, 1), "total_seconds": round(time.time() - t0, 1),
                                  "rows": rows, "table": table}, indent=2) + "\n")
    print(f"wrote {a.json}")
    if not passed:
        print("check_arm: FAILED: ARM logits differ from x86 beyond the tolerances (rows marked 'no')")
        return 1
    if not control_caught:
        print("check_arm: FAILED: the negative control (no ggml_cont) passed, so this check cannot see the bug")
        return 1
    print("check_arm: passed" + (" (and the negative control failed, as it must)" if control else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
