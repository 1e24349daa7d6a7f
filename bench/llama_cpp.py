"""A second peer: llama.cpp's ``llama-server`` on the default model's GGUF file, built offline from source.

The source is llama.cpp as vendored in the ``llama-cpp-python`` sdist from PyPI (model hubs and GitHub are
out of reach; the package registry is not). ``ensure_binary`` builds the ``llama-server`` target once with
CMake (Release, static, CPU only, no UI, no network features) and caches the binary under the cache folder.

Found on the 2-core dev VM (AMD EPYC, AVX-512 F/CD/VL/DQ/BW/VNNI/VBMI/BF16, no AMX in /proc/cpuinfo): the
sdist's llama.cpp is commit 0c1e570 (``llama-server --version``: 0.5.0-dev, build 1). The build (pip download
~35 s, then 10.6 CPU-min of compiling at -j2) took 6.1 min wall; ``cmake_flags(avx512=True)`` below, since a
small AVX-512 program ran here and so did the binary. LLAMA_CURL is deprecated and ignored in this version
(downloads use cpp-httplib; LLAMA_OPENSSL=OFF leaves HTTPS out); LLAMA_USE_PREBUILT_UI=OFF keeps CMake from
fetching the web UI (it builds without one). The binary is static but for libgomp/libstdc++/libc. Context:
with ``-np`` given and no ``--kv-unified``, the KV cache is split into one stream per slot, each of ``-c / -np``
tokens rounded up to a multiple of 256 (``n_ctx_slot`` in the log); ``--kv-unified`` (it exists: one buffer
that every slot may fill up to ``-c``, capped at the model's 8192 training tokens) made 16 concurrent
RAG-shaped streams (931-1125 prompt tokens in SmolLM2's tokenizer, which makes the benchmark's random words
~1.35x longer than its own tokenizer does, + 128 new) 29% slower (111.6 s against 86.4 s: each decode step
attends over all the slots' cells), so it is left off; ``-c 24576`` gives 1536 per slot. (That burst at -t 2:
23.7 tok/s, first tokens after 9-66 s: prompts are prefilled n_batch = 2048 tokens a step, ~8 s a step.)
Prompt caching is left at its defaults: ``cache_prompt`` on (a slot reuses the KV of its previous prompt's
common prefix), slots picked by prompt similarity >= 0.10 (``--slot-prompt-similarity``) else LRU,
``--cache-ram 8192`` MiB of host-RAM prompt cache with ``--cache-idle-slots`` (idle slots' prompts saved there
on a new task, restored into a slot when a new prompt matches), ``--cache-reuse 0`` (no KV shifting); no KV is
shared between slots. Requests: ``max_tokens`` (alias of ``n_predict``) and ``ignore_eos`` (a -inf bias on the
end-of-generation tokens) give exactly that many tokens; ``temperature: 0`` is greedy; the ``model`` field is
ignored (one model).
"""

import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from server_process import ROOT, stop_server

LLAMA_CPP_PYTHON = "0.3.36"  # the sdist whose vendor/llama.cpp is built
# Its n-gram speculation kinds (no draft model): the fair peer of --speculate for an answer that quotes its prompt.
NGRAM_SPEC_TYPES = ("ngram-simple", "ngram-map-k", "ngram-map-k4v", "ngram-mod", "ngram-cache")
PARALLEL = 16  # slots: the benchmark's concurrent clients
SLOT_TOKENS = 1536  # one request: up to ~1130 prompt tokens (SmolLM2's tokenizer) + 128 new, with room
CONTEXT = PARALLEL * SLOT_TOKENS
AVX512_PROBE = r"""
#include <immintrin.h>
#include <stdio.h>
int main(void) {
    volatile float in[16];
    for (int i = 0; i < 16; i++) in[i] = (float)i;
    __m512 a = _mm512_loadu_ps((const float *)in);
    __m512 b = _mm512_fmadd_ps(a, a, a);
    __m512i c = _mm512_add_epi8(_mm512_castps_si512(b), _mm512_set1_epi8(1));
    __mmask16 m = _mm512_cmpgt_epi32_mask(c, _mm512_setzero_si512());
    __m256i d = _mm256_maskz_mov_epi32(0xff, _mm256_set1_epi32((int)m));
    printf("%d\n", _mm256_extract_epi32(d, 0) != 0);
    return 0;
}
"""
AVX512_FLAGS = ["-mavx512f", "-mavx512cd", "-mavx512vl", "-mavx512dq", "-mavx512bw"]  # what GGML_AVX512=ON adds


def cpu_flags() -> set:
    try:
        return set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return set()


def cmake_flags(avx512: bool, listed: set = frozenset()) -> list:
    """Portable x86-64 flags plus the VNNI/BF16 extensions this CPU lists (the llama.cpp a user builds has them:
    one stream ran 57 tok/s without, 101-105 with, on the AVX-512 VNNI EPYC). Never native, never AMX: a native
    build dies with ``Illegal instruction`` on VMs that list AMX but trap it, and AVX-VNNI (the VEX encoding) is
    not AVX-512 VNNI: only what /proc/cpuinfo names by its own name is turned on."""
    extensions = [f"-DGGML_AVX512_VNNI={'ON' if avx512 and 'avx512_vnni' in listed else 'OFF'}",
                  f"-DGGML_AVX512_BF16={'ON' if avx512 and 'avx512_bf16' in listed else 'OFF'}",
                  f"-DGGML_AVX_VNNI={'ON' if 'avx_vnni' in listed else 'OFF'}"]
    return extensions + ["-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", "-DGGML_NATIVE=OFF", "-DGGML_AVX=ON",
            "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON", "-DGGML_BMI2=ON",
            f"-DGGML_AVX512={'ON' if avx512 else 'OFF'}", "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF",
            "-DGGML_AMX_BF16=OFF", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF",
            "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DGGML_CCACHE=OFF"]


def avx512_runs(work: Path) -> bool:
    """Whether /proc/cpuinfo lists AVX-512 (F, CD, VL, DQ, BW) and a small program using it runs here."""
    flags = cpu_flags()
    if not {"avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw"} <= flags:
        return False
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        return False
    (work / "probe.c").write_text(AVX512_PROBE)
    built = subprocess.run([compiler, "-O2", *AVX512_FLAGS, "-mfma", str(work / "probe.c"), "-o", str(work / "probe")],
                           capture_output=True)
    if built.returncode != 0:
        return False
    ran = subprocess.run([str(work / "probe")], capture_output=True, text=True, timeout=30)
    return ran.returncode == 0 and ran.stdout.strip() == "1"


def starts(binary: Path) -> bool:
    """Whether the binary gets as far as printing its version (not killed by SIGILL at start)."""
    ran = subprocess.run([str(binary), "--version"], capture_output=True, timeout=60)
    return ran.returncode == 0


def ensure_binary(cache: Path) -> Path:
    """The ``llama-server`` binary under ``cache / llama-server-<version>`` (built the first time: minutes)."""
    folder = cache / f"llama-server-{LLAMA_CPP_PYTHON}-vnni"  # -vnni: built with the CPU's own extensions
    binary = folder / "llama-server"
    if (folder / ".complete").exists():
        return binary
    print(f"building llama.cpp's llama-server (llama-cpp-python {LLAMA_CPP_PYTHON} sdist) into {folder} "
          "(first run only, minutes) ...", flush=True)
    started = time.monotonic()
    cache.mkdir(parents=True, exist_ok=True)
    log_path = cache / f"llama-server-{LLAMA_CPP_PYTHON}.build.log"
    with tempfile.TemporaryDirectory(prefix="llama-server-build-", dir=cache) as tmp, open(log_path, "w") as log:
        work = Path(tmp)

        def run(command: list, **kwargs) -> None:
            log.write("$ " + " ".join(command) + "\n")
            log.flush()
            if subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, **kwargs).returncode != 0:
                raise SystemExit(f"building llama-server failed; see {log_path}")

        run([sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check", "--no-deps",
             "--no-binary", ":all:", f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", str(work)])
        with tarfile.open(next(work.glob("llama_cpp_python-*.tar.gz"))) as sdist:
            sdist.extractall(work, filter="data")
        source = next(work.glob("llama_cpp_python-*/vendor/llama.cpp"))
        avx512 = avx512_runs(work)
        while True:
            build = work / f"build-{'avx512' if avx512 else 'avx2'}"
            flags = cmake_flags(avx512, cpu_flags())
            run(["cmake", "-S", str(source), "-B", str(build), *flags])
            run(["cmake", "--build", str(build), "--target", "llama-server", "--config", "Release", "-j2"])
            built = build / "bin" / "llama-server"
            if starts(built):
                break
            if not avx512:
                raise SystemExit(f"the llama-server just built does not start; see {log_path}")
            print("llama-server built with AVX-512 does not start here; building again without it ...", flush=True)
            avx512 = False
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir()
        shutil.copy2(built, binary)
        minutes = (time.monotonic() - started) / 60
        (folder / "build-flags.txt").write_text(" ".join(flags) + f"\nbuilt in {minutes:.1f} min\n")
        (folder / ".complete").touch()
    print(f"llama-server built in {minutes:.1f} min", flush=True)
    return binary


def healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):  # refused while starting, 503 while the model loads
        return False


def start(binary: Path, gguf_file: Path, port: int, log_path: Path, threads: int, parallel: int = PARALLEL,
          context: int = CONTEXT, timeout: float = 120, spec_type: str = "none") -> subprocess.Popen:
    """``llama-server`` on ``gguf_file``, in a process group of its own, once /health answers 200. ``spec_type``:
    its speculative decoding (``none``, or one of NGRAM_SPEC_TYPES with that kind's own defaults)."""
    command = [str(binary), "-m", str(gguf_file), "--port", str(port), "-t", str(threads), "-np", str(parallel),
               "-c", str(context), "--host", "127.0.0.1", "--spec-type", spec_type]
    server = subprocess.Popen(command, cwd=ROOT, stdout=open(log_path, "w"), stderr=subprocess.STDOUT,
                              start_new_session=True)
    deadline = time.monotonic() + timeout
    while not healthy(port):
        if server.poll() is not None or time.monotonic() > deadline:
            died = server.returncode == -signal.SIGILL
            stop_server(server)
            raise SystemExit(f"llama-server did not start{' (Illegal instruction)' if died else ''}; see {log_path}")
        time.sleep(0.25)
    return server


def request_fields(new_tokens: int) -> dict:
    """Exactly ``new_tokens`` greedy tokens: ``max_tokens`` caps the answer, ``ignore_eos`` bans the end tokens."""
    return {"max_tokens": new_tokens, "ignore_eos": True, "temperature": 0}
