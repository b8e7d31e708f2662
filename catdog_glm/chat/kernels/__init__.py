"""catdog's own CPU kernels for quantized Linear layers and decode attention: C++ (csrc/kernels.cpp, attention.h)
registered as torch.library ops (`torch.ops.catdog.q4_linear`, `q8_linear`, `q4_quantize`, `q4_dequantize`,
`decode_attention`), so the model, the scheduler and torch.compile see ordinary ops.

Why our own: torch's CPU int4 kernel (`_weight_int4pack_mm_for_cpu`) turns every weight into a float and multiplies in
fp32, which is compute-bound at about half the memory bandwidth on the 2-core machines we measure on; llama.cpp, its
peers (llamafile's tinyBLAS, SGLang's CPU kernels) and ours instead quantize the activations to int8 per block of 32
and multiply bytes with VNNI into int32. No maintained PyPI package ships such kernels for torch 2.14 (IPEX pins torch
2.8, torchao's wheel has no CPU kernels, optimum-quanto and hqq call torch's kernel).

Built with torch.utils.cpp_extension on first use, or ahead of time by `make install` (`python -m
catdog_glm.chat.kernels`), into the catdog cache under a key of the source, torch's version and the CPU's flags. The
instruction set is chosen at run time (AVX-512 VNNI, AVX-VNNI, AVX2, plain C++). Without a compiler, or when a kernel
disagrees with the plain reference on its self-check, one line says so and the quantized layers use torch's kernels.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from pathlib import Path

from catdog_glm.device import cpu_flags, cpu_name

log = logging.getLogger(__name__)

SOURCES = Path(__file__).parent / "csrc"
SOURCE = SOURCES / "kernels.cpp"
DISABLE_ENV = "CATDOG_KERNELS"  # "0": use torch's kernels (tests, comparisons)
# the `path` argument of q4_linear / q8_linear: by row count, int8 activations (few rows), dequantized GEMM (many)
AUTO, FEW_ROWS, MANY_ROWS = 0, 1, 2
# CPU flags that change which kernel runs: part of the build key, so a cache moved to another CPU is rebuilt
RELEVANT_FLAGS = ("avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "amx_bf16")

_lock = threading.Lock()
_module = None
_failure: str | None = None  # why the kernels are not used (logged once)


def build_key() -> str:
    import torch

    flags = cpu_flags()
    sources = [p.read_bytes().hex() for p in sorted(SOURCES.iterdir()) if p.suffix in (".cpp", ".h")]
    parts = [*sources, torch.__version__, ",".join(f for f in RELEVANT_FLAGS if f in flags)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def kernels_root() -> Path:
    """Where built kernels are kept: $CATDOG_KERNELS_DIR, else kernels/ in the catdog cache."""
    from catdog_glm.chat.cache_paths import cache_dir

    return Path(os.environ.get("CATDOG_KERNELS_DIR") or cache_dir() / "kernels")


def build_dir() -> Path:
    return kernels_root() / build_key()


def _compile(verbose: bool = False):
    import shutil

    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler ({compiler}) on PATH; install g++ (Debian: apt-get install g++)")
    # torch's extension builder logs a CUDA probe at import and a compiler-ABI banner; our one line says enough
    builder_log = logging.getLogger("torch.utils.cpp_extension")
    level = builder_log.level
    builder_log.setLevel(logging.ERROR)
    try:
        import torch.utils.cpp_extension as cpp

        folder = build_dir()
        folder.mkdir(parents=True, exist_ok=True)
        return cpp.load(
            name=f"catdog_kernels_{folder.name}",
            sources=[str(SOURCE)],
            extra_cflags=["-O3", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            build_directory=str(folder),
            with_cuda=False,
            verbose=verbose,
        )
    finally:
        builder_log.setLevel(level)


def _register_fakes() -> None:
    """Shapes for torch.compile / meta tensors: the ops' outputs without running them."""
    import torch

    def q4_linear(x, qweight, scales, mins=None, bias=None, path=0):
        return x.new_empty((*x.shape[:-1], qweight.shape[0]))

    def q8_linear(x, weight, scales, bias=None, path=0):
        return x.new_empty((*x.shape[:-1], weight.shape[0]))

    torch.library.register_fake("catdog::q4_linear", q4_linear)
    torch.library.register_fake("catdog::q8_linear", q8_linear)

    def dequantize(qweight, scales, mins, dtype):
        return qweight.new_empty((qweight.shape[0], qweight.shape[1] * 2), dtype=dtype)

    torch.library.register_fake("catdog::q4_dequantize", dequantize)

    def decode_attention(q, k, v, caches, layer, lengths, scale):
        return q.new_empty(q.shape)

    torch.library.register_fake("catdog::decode_attention", decode_attention)
    torch.library.register_fake("catdog::rms_norm", lambda x, weight, eps: torch.empty_like(x))
    torch.library.register_fake(
        "catdog::add_rms_norm", lambda x, residual, weight, eps: (torch.empty_like(x), torch.empty_like(x))
    )
    torch.library.register_fake("catdog::rope_", lambda q, k, cos, sin, interleaved: None)

    def silu_mul(gate_up):
        return gate_up.new_empty((*gate_up.shape[:-1], gate_up.shape[-1] // 2))

    torch.library.register_fake("catdog::silu_mul", silu_mul)


def self_check(module) -> str | None:
    """Every path this CPU has against the plain reference at a few shapes; a message when one disagrees."""
    import torch

    from catdog_glm.chat.kernels import reference

    generator = torch.Generator().manual_seed(0)
    chosen = module.isa()
    try:
        for k in (128, 192):
            weight = torch.randn(40, k, generator=generator)
            packed, scales, _ = torch.ops.catdog.q4_quantize(weight)
            packed1, scales1, mins1 = torch.ops.catdog.q4_quantize(weight, True)
            int8 = torch.randint(-127, 128, (40, k), dtype=torch.int8, generator=generator)
            int8_scales = torch.rand(40, generator=generator)
            for rows in (1, 5, 20):
                x = torch.randn(rows, k, generator=generator)
                if rows <= module.max_small_rows():  # int8 activations, exactly as the reference makes them
                    want4 = reference.q4_linear(x, packed, scales)
                    want41 = reference.q4_linear(x, packed1, scales1, mins1)
                    want8 = reference.q8_linear(x, int8, int8_scales)
                else:  # many rows: dequantized weights into a float GEMM
                    want4 = x @ reference.dequantize_q4(packed, scales).t()
                    want41 = x @ reference.dequantize_q4(packed1, scales1, mins1).t()
                    want8 = x @ (int8.float() * int8_scales[:, None]).t()
                for isa in module.supported_isas():
                    module.set_isa(isa)
                    got4 = torch.ops.catdog.q4_linear(x, packed, scales)
                    got41 = torch.ops.catdog.q4_linear(x, packed1, scales1, mins1)
                    got8 = torch.ops.catdog.q8_linear(x, int8, int8_scales)
                    pairs = (("int4", got4, want4), ("asymmetric int4", got41, want41), ("int8", got8, want8))
                    for name, got, want in pairs:
                        if not torch.allclose(got, want, rtol=1e-4, atol=1e-3 * float(want.abs().max())):
                            return f"the {isa} {name} kernel disagrees with the reference (K={k}, {rows} rows)"
        for isa in module.supported_isas():
            module.set_isa(isa)
            problem = _check_attention(generator) or _check_fused(generator)
            if problem:
                return f"the {isa} {problem}"
    finally:
        module.set_isa(chosen)
    return None


def _check_attention(generator) -> str | None:
    """decode_attention against SDPA per request: grouped heads, ragged lengths, fp32 and bf16."""
    import torch

    from catdog_glm.chat.kernels import reference

    for dtype, tolerance in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        lengths = [0, 5, 37]
        q = torch.randn(3, 6, 16, generator=generator).to(dtype)
        k, v = (torch.randn(3, 2, 16, generator=generator).to(dtype) for _ in range(2))
        caches = [torch.randn(2, 2, 2, n + 3, 16, generator=generator).to(dtype) for n in lengths]
        want_caches = [c.clone() for c in caches]
        got = torch.ops.catdog.decode_attention(q, k, v, caches, 1, lengths, 0.25)
        want = reference.decode_attention(q, k, v, want_caches, 1, lengths, 0.25)
        if not torch.allclose(got.float(), want.float(), atol=tolerance, rtol=tolerance):
            return f"attention kernel disagrees with SDPA ({dtype})"
        if not all(torch.equal(a, b) for a, b in zip(caches, want_caches, strict=True)):
            return f"attention kernel wrote its cache wrongly ({dtype})"
    return None


def _check_fused(generator) -> str | None:
    """RMSNorm, rotary embeddings and SiLU * up against transformers' formulas, fp32 and bf16."""
    import torch

    from catdog_glm.chat.kernels import reference

    for dtype, tolerance in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        x, residual = (torch.randn(5, 40, generator=generator).to(dtype) for _ in range(2))
        weight = torch.rand(40, generator=generator).to(dtype)
        total, normed = torch.ops.catdog.add_rms_norm(x, residual, weight, 1e-6)
        pairs = [
            ("rms_norm", torch.ops.catdog.rms_norm(x, weight, 1e-6), reference.rms_norm(x, weight, 1e-6)),
            ("add_rms_norm", normed, reference.rms_norm(x + residual, weight, 1e-6)),
            ("residual add", total, x + residual),
        ]
        gate_up = torch.randn(3, 2 * 37, generator=generator).to(dtype) * 4
        pairs.append(("silu_mul", torch.ops.catdog.silu_mul(gate_up), reference.silu_mul(gate_up)))
        for interleaved, width in ((False, 16), (True, 8)):
            q, k = torch.randn(4, 6, 16, generator=generator).to(dtype), torch.randn(4, 2, 16, generator=generator)
            k = k.to(dtype)
            angles = torch.rand(4, width, generator=generator) * 6
            cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
            want_q, want_k = reference.rope(q, k, cos, sin, interleaved)
            torch.ops.catdog.rope_(q, k, cos, sin, interleaved)
            pairs += [("rope", q, want_q), ("rope", k, want_k)]
        for name, got, want in pairs:
            if got.dtype != want.dtype or not torch.allclose(got.float(), want.float(), atol=tolerance, rtol=tolerance):
                return f"fused {name} disagrees with transformers' formula ({dtype})"
    return None


def load(verbose: bool = False):
    """The compiled kernels' module (its ops registered), or None when they cannot be used here (one line logged)."""
    global _module, _failure
    with _lock:
        if _module is not None or _failure is not None:
            return _module
        if os.environ.get(DISABLE_ENV, "1") == "0":
            _failure = f"{DISABLE_ENV}=0"
            log.info("catdog kernels off (%s=0): quantized layers use torch's kernels", DISABLE_ENV)
            return None
        try:
            import torch

            with torch.device("cpu"):  # a first call from inside a meta-device context still checks real tensors
                module = _compile(verbose)
                _register_fakes()
                problem = self_check(module)
        except Exception as e:  # noqa: BLE001 - no compiler, a failed build: torch's kernels then, nothing else changes
            problem = (
                f"could not build them ({str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__})"
            )
        if problem:
            _failure = problem
            log.warning("catdog's CPU kernels are not used: %s; quantized layers use torch's kernels", problem)
            return None
        _module = module
        log.info("catdog CPU kernels: %s path", module.isa())
        return _module


def available() -> bool:
    return load() is not None


def status() -> dict:
    """What runs here, for `catdog models`-style reports and benchmarks."""
    module = load()
    return {
        "kernels": "catdog" if module is not None else "torch",
        "path": module.isa() if module is not None else None,
        "paths": list(module.supported_isas()) if module is not None else [],
        "why_not": _failure,
        "cpu": cpu_name(),
    }
