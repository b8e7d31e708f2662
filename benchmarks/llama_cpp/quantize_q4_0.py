"""f16 GGUF -> Q4_0 GGUF with llama.cpp's own quantizer (llama-cpp-python's bindings).

python quantize_q4_0.py IN_F16.gguf OUT_Q4_0.gguf [THREADS]   (the Python that has llama-cpp-python)
"""

import ctypes
import resource
import sys
import time

import llama_cpp

src, dst = sys.argv[1], sys.argv[2]
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
params.nthread = int(sys.argv[3]) if len(sys.argv) > 3 else 2
started = time.perf_counter()
rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params))
print(
    f"rc={rc} {time.perf_counter() - started:.1f} s, peak RSS "
    f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB"
)
sys.exit(rc)
