"""Run llama.cpp itself: convert, quantize, embed, inspect GGUF files.

The ``llama_cpp`` exporter only writes a ``--tensor-type-file``; checking that a plan
really deploys needs llama.cpp's own tools, pinned to one release so results repeat:

* ``convert_hf_to_gguf.py`` with the ``gguf-py`` it was written against (PyPI's
  ``gguf`` is a different release and the converter breaks on it),
* ``llama-quantize``, built from source (no wheel ships it),

both taken from the sdist of ``llama-cpp-python==0.3.36``, which vendors llama.cpp.
``install()`` fetches that sdist once with pip, keeps only those files in
``tools_dir()`` and builds ``llama-quantize`` for a portable AVX2 CPU (a ``-march=native``
build dies with SIGILL on some AMX machines). Embeddings come from the prebuilt
``xllamacpp`` wheel (the ``llamacpp`` extra), called in-process: its server object
binds an ephemeral port on 127.0.0.1 but requests go straight to its handler.

    python -m mpsearch.exporters.llama_runtime install [--no-quantize] [--dest DIR] [--sdist FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

from ..errors import MPSearchError

LLAMA_CPP_PYTHON = "0.3.36"
SDIST = f"llama_cpp_python-{LLAMA_CPP_PYTHON}"
VENDOR = f"{SDIST}/vendor/llama.cpp/"
MARKER = ".mpsearch-install.json"
QUANTIZE = "bin/llama-quantize"
CONVERTER = "convert_hf_to_gguf.py"
INSTALL_HINT = "run `make llamacpp` or `python -m mpsearch.exporters.llama_runtime install`"
XLLAMACPP_HINT = "pip install 'mpsearch[llamacpp]'"

# what stays in tools_dir() (paths under vendor/llama.cpp)
KEEP = (CONVERTER, "conversion/", "gguf-py/", "LICENSE")
# what the CMake configure of llama-quantize reads; ggml backends other than the CPU one are
# only added when enabled, and tools/CMakeLists.txt is replaced by one naming quantize alone
BUILD = ("CMakeLists.txt", "cmake/", "ggml/", "src/", "include/", "common/", "vendor/",
         "tools/quantize/", "licenses/")
GGML_BACKENDS_KEPT = ("ggml-cpu",)
TOOLS_CMAKE = "# written by mpsearch: only llama-quantize\nllama_add_compile_flags()\nadd_subdirectory(quantize)\n"
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=OFF", "-DGGML_AVX=ON", "-DGGML_AVX2=ON",
    "-DGGML_FMA=ON", "-DGGML_F16C=ON", "-DGGML_BMI2=ON", "-DLLAMA_CURL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF",
    "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_APP=OFF", "-DGGML_CCACHE=OFF",  # app/ is not extracted; no ccache nag
)


def tools_dir() -> Path:
    """Where ``install()`` puts the tools: ``$MPSEARCH_LLAMA_CPP_DIR`` or the user cache."""
    env = os.environ.get("MPSEARCH_LLAMA_CPP_DIR")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "mpsearch" / f"llama.cpp-{LLAMA_CPP_PYTHON}"


def _marker(dest: Path) -> dict | None:
    try:
        info = json.loads((dest / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and info.get("version") == LLAMA_CPP_PYTHON else None


def _installed(path: str) -> Path:
    """``tools_dir() / path`` of a finished install, or a one-line error saying how to install."""
    dest = tools_dir()
    if _marker(dest) is None:
        raise MPSearchError(f"llama.cpp tools not installed in {dest}: {INSTALL_HINT}")
    p = dest / path
    if not p.exists():
        what = "llama-quantize (the install was made with --no-quantize)" if path == QUANTIZE else path
        raise MPSearchError(f"llama.cpp tools not installed: no {what} in {dest}: {INSTALL_HINT}")
    return p


def _last_line(text: str, default: str = "no output") -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errs = [ln for ln in lines if "error" in ln.lower() or "failed" in ln.lower()]
    return (errs or lines or [default])[-1]


class _Progress:
    def __init__(self, quiet: bool):
        self.t0 = time.monotonic()
        self.quiet = quiet

    def __call__(self, msg: str) -> None:
        if not self.quiet:
            print(f"[llama.cpp {time.monotonic() - self.t0:6.1f}s] {msg}", flush=True)


# -- install ---------------------------------------------------------------------------------

def _download_sdist(into: Path, say) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           "--disable-pip-version-check", f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", str(into)]
    say(f"downloading the llama-cpp-python {LLAMA_CPP_PYTHON} sdist with pip (77 MB)")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(into.glob(f"{SDIST}.tar.gz"))
    if proc.returncode != 0 or not found:
        raise MPSearchError(f"could not download llama-cpp-python=={LLAMA_CPP_PYTHON} with pip "
                            f"({_last_line(proc.stderr + proc.stdout)}); pass --sdist FILE to use a copy")
    return found[0]


def _wanted(rel: str, build: bool) -> bool:
    """Whether a path under vendor/llama.cpp is extracted."""
    def under(prefixes):
        return any(rel == p or rel.startswith(p) if p.endswith("/") else rel == p for p in prefixes)
    if under(KEEP):
        return True
    if not build or not under(BUILD):
        return False
    if rel.startswith("ggml/src/ggml-"):
        top = rel.split("/")[2]
        if "." not in top and top not in GGML_BACKENDS_KEPT:  # a backend folder
            return False
    return True


def _extract(sdist: Path, into: Path, build: bool) -> int:
    """Extract the wanted files of the sdist's vendored llama.cpp into ``into``; returns the count."""
    n = 0
    try:
        with tarfile.open(sdist, "r:gz") as tar:
            for m in tar:
                if not m.name.startswith(VENDOR) or not (m.isfile() or m.isdir()):
                    continue
                rel = m.name[len(VENDOR):]
                if not rel or not _wanted(rel + ("/" if m.isdir() else ""), build):
                    continue
                m.name = rel
                tar.extract(m, into, filter="data")
                n += m.isfile()
    except (OSError, tarfile.TarError) as e:
        why = (str(e).splitlines() or [type(e).__name__])[0]
        raise MPSearchError(f"cannot read the sdist {sdist} ({why}): pass the {SDIST}.tar.gz file with --sdist") from None
    if not (into / CONVERTER).is_file():
        raise MPSearchError(f"{sdist} is not the llama-cpp-python {LLAMA_CPP_PYTHON} sdist "
                            f"(no vendor/llama.cpp/{CONVERTER}); pass the right file with --sdist")
    return n


def _run_logged(cmd: list[str], log: Path, what: str, cwd: Path | None = None) -> None:
    with open(log, "a") as fh:
        fh.write(f"$ {' '.join(cmd)}\n")
        fh.flush()
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=cwd)
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-20000:]
        raise MPSearchError(f"{what} failed ({_last_line(tail)}); full log in {log}")


def _check_build_tools() -> None:
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            raise MPSearchError(f"building llama-quantize needs `{tool}` on PATH: install it "
                                "(e.g. apt-get install cmake g++ ninja-build) or use --no-quantize")


def _build_quantize(src: Path, work: Path, log: Path, jobs: int, say) -> Path:
    (src / "tools" / "CMakeLists.txt").write_text(TOOLS_CMAKE)
    build = work / "build"
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    say("configuring llama-quantize (cmake)")
    _run_logged(["cmake", "-S", str(src), "-B", str(build), *gen, *CMAKE_FLAGS], log, "cmake configure")
    say(f"building llama-quantize with {jobs} job(s): minutes; log in {log}")
    _run_logged(["cmake", "--build", str(build), "--target", "llama-quantize", "--parallel", str(jobs)],
                log, "building llama-quantize")
    exe = build / "bin" / "llama-quantize"
    if not exe.is_file():
        raise MPSearchError(f"the build finished but made no {exe}; see {log}")
    return exe


def install(build_quantize: bool = True, dest: Path | None = None, sdist: Path | None = None,
            jobs: int | None = None, quiet: bool = False) -> Path:
    """Put llama.cpp's converter (and ``llama-quantize``) in ``dest`` (default ``tools_dir()``).

    Idempotent: a finished install with what is asked returns at once. Keeps
    ``convert_hf_to_gguf.py``, ``conversion/``, ``gguf-py/``, ``LICENSE``, ``bin/llama-quantize``
    and ``install.log``; sources and build intermediates live in a scratch folder next to
    ``dest`` and are deleted.
    """
    dest = Path(dest).expanduser() if dest is not None else tools_dir()
    info = _marker(dest)
    if info is not None and (info.get("quantize") or not build_quantize) \
            and (dest / CONVERTER).is_file() and (not build_quantize or (dest / QUANTIZE).is_file()):
        return dest
    if sdist is not None and not Path(sdist).expanduser().is_file():
        raise MPSearchError(f"no sdist at {sdist}: pass the {SDIST}.tar.gz file")
    if build_quantize:
        _check_build_tools()
    say = _Progress(quiet)
    jobs = jobs or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()) or 1
    try:
        dest.mkdir(parents=True, exist_ok=True)
        (dest / MARKER).unlink(missing_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{dest.name}-work-", dir=dest.parent))
    except OSError as e:
        raise MPSearchError(f"cannot write to {dest}: {e}; pass another --dest or set MPSEARCH_LLAMA_CPP_DIR") from None
    log = dest / "install.log"
    log.write_text("")
    timings = {}
    try:
        if sdist is None:
            t = time.monotonic()
            sdist = _download_sdist(work, say)
            timings["download_s"] = round(time.monotonic() - t, 1)
        sdist = Path(sdist).expanduser()
        say(f"extracting {'converter and build sources' if build_quantize else 'the converter'} from {sdist.name}")
        t = time.monotonic()
        src = work / "llama.cpp"
        n = _extract(sdist, src, build_quantize)
        timings["extract_s"] = round(time.monotonic() - t, 1)
        say(f"extracted {n} files")
        exe = None
        if build_quantize:
            t = time.monotonic()
            exe = _build_quantize(src, work, log, jobs, say)
            timings["build_s"] = round(time.monotonic() - t, 1)
            say(f"built llama-quantize in {timings['build_s']:.0f}s")
        for rel in KEEP:
            target = dest / rel.rstrip("/")
            if target.is_dir():
                shutil.rmtree(target)
            shutil.move(str(src / rel.rstrip("/")), str(target))
        if exe is not None:
            (dest / "bin").mkdir(exist_ok=True)
            if shutil.which("strip"):  # 7 MB -> 6 MB
                subprocess.run(["strip", str(exe)], capture_output=True)
            staged = dest / (QUANTIZE + ".new")
            shutil.copy2(exe, staged)
            os.replace(staged, dest / QUANTIZE)  # safe while an old copy runs
        (dest / MARKER).write_text(json.dumps({
            "version": LLAMA_CPP_PYTHON, "quantize": exe is not None, "sdist": sdist.name,
            "cmake_flags": list(CMAKE_FLAGS) if exe is not None else None, **timings}, indent=1) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    size = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
    say(f"installed in {dest} ({size / 2**20:.1f} MiB)")
    return dest


# -- convert, quantize -----------------------------------------------------------------------

def convert_hf(model_dir, out_path, outtype: str = "f32") -> Path:
    """A Hugging Face model folder -> GGUF, with llama.cpp's own converter (offline)."""
    converter = _installed(CONVERTER)
    model_dir, out_path = Path(model_dir), Path(out_path)
    if not (model_dir / "config.json").is_file():
        raise MPSearchError(f"{model_dir} is not a Hugging Face model folder (no config.json)")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.pop("NO_LOCAL_GGUF", None)
    env["PYTHONPATH"] = os.pathsep.join([str(converter.parent / "gguf-py")]
                                        + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    cmd = [sys.executable, str(converter), str(model_dir), "--outtype", outtype, "--outfile", str(out_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0 or not out_path.is_file():
        lines = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip()]
        raise MPSearchError(f"convert_hf_to_gguf.py failed on {model_dir}: {lines[-1] if lines else 'exit code ' + str(proc.returncode)}")
    return out_path


def llama_quantize(src, dst, base_type: str, tensor_type_file=None, extra_args=(),
                   n_threads: int | None = None) -> str:
    """Run ``llama-quantize [extra_args] [--tensor-type-file F] src dst base_type [n_threads]``; its output."""
    exe = _installed(QUANTIZE)
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise MPSearchError(f"no GGUF file at {src}")
    cmd = [str(exe), *map(str, extra_args)]
    if tensor_type_file is not None:
        if not Path(tensor_type_file).is_file():
            raise MPSearchError(f"no tensor type file at {tensor_type_file}")
        cmd += ["--tensor-type-file", str(tensor_type_file)]
    cmd += [str(src), str(dst), str(base_type)]
    if n_threads is not None:
        cmd.append(str(int(n_threads)))
    dst.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
    if proc.returncode != 0 or not dst.is_file():
        if proc.stdout.lstrip().startswith("usage:"):
            why = f"it rejected the arguments {' '.join(cmd[1:])} (see `{exe} --help`)"
        else:
            why = _last_line(proc.stdout, f"exit code {proc.returncode}")
        raise MPSearchError(f"llama-quantize {base_type} failed on {src.name}: {why}")
    return proc.stdout


# -- embeddings ------------------------------------------------------------------------------

def embeddings(gguf_path, texts: list[str], n_threads: int = 1) -> np.ndarray:
    """Sentence embeddings from llama.cpp (xllamacpp): float32 ``(len(texts), dim)``, L2-normalised.

    Pooling is the GGUF's own (``<arch>.pooling_type``). One request with every text; the
    server runs them one sequence at a time with ``n_threads`` threads (1 is by far the
    fastest on a busy machine).
    """
    try:
        import xllamacpp
    except ImportError:
        raise MPSearchError(f"llama.cpp embeddings need xllamacpp: {XLLAMACPP_HINT}") from None
    path = Path(gguf_path)
    if not path.is_file():
        raise MPSearchError(f"no GGUF file at {path}")
    texts = [str(t) for t in texts]
    meta = _gguf_meta(path)
    if not texts:
        return np.zeros((0, meta["n_embd"] or 0), dtype=np.float32)
    n_ctx = meta["n_ctx"] or 512
    p = xllamacpp.CommonParams()
    p.model.path = str(path)
    p.embedding = True
    p.embd_normalize = 2  # Euclidean
    p.n_parallel = 1
    p.n_ctx = p.n_batch = p.n_ubatch = n_ctx  # a non-causal model needs a whole input in one ubatch
    p.cpuparams.n_threads = p.cpuparams_batch.n_threads = int(n_threads)
    p.warmup = False
    p.verbosity = -1
    p.hostnames = ["127.0.0.1"]
    try:
        server = xllamacpp.Server(p)
    except RuntimeError as e:
        raise MPSearchError(f"xllamacpp cannot load {path}: {e}") from None
    try:
        out = server.handle_embeddings({"input": texts, "encoding_format": "float"})
    finally:
        del server
    data = out.get("data") if isinstance(out, dict) else None
    if not data:
        err = out.get("error", out) if isinstance(out, dict) else out
        msg = str(err.get("message", err) if isinstance(err, dict) else err)
        if "too large" in msg:  # the server's hint (a bigger batch) is not ours to take
            msg = f"{msg.split('. ')[0]}; the model's context is {n_ctx} tokens: shorten or split the text"
        raise MPSearchError(f"llama.cpp embeddings failed on {path.name}: {msg}")
    rows = [d["embedding"] for d in sorted(data, key=lambda d: d["index"])]
    if len(rows) != len(texts) or any(rows and isinstance(r[0], list) for r in rows):
        raise MPSearchError(f"{path.name} gives no pooled embedding per text (pooling type {meta['pooling']}); "
                            "convert a model whose GGUF sets a pooling type")
    emb = np.asarray(rows, dtype=np.float32)
    norms = np.linalg.norm(emb, axis=1, keepdims=True)
    return emb / np.maximum(norms, 1e-12)


# -- GGUF inspection -------------------------------------------------------------------------

def _gguf():
    try:
        import gguf
        return gguf
    except ImportError:
        pass
    vendored = tools_dir() / "gguf-py"
    if vendored.is_dir():
        sys.path.append(str(vendored))
        import gguf
        return gguf
    raise MPSearchError("reading GGUF files needs gguf-py: pip install 'mpsearch[export]'")


def _reader(path):
    gguf = _gguf()
    path = Path(path)
    if not path.is_file():
        raise MPSearchError(f"no GGUF file at {path}")
    try:
        return gguf, gguf.GGUFReader(str(path))
    except (ValueError, OSError) as e:
        raise MPSearchError(f"{path} is not a readable GGUF file: {e}") from None


# GGUF value types -> struct format (8: string, 9: array); see gguf-py's GGUFValueType
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def _gguf_kv(path) -> dict:
    """The scalar and string metadata of a GGUF file (arrays skipped), read from its header.

    GGUFReader would do, but it takes a second on a BERT file (one numpy view per vocabulary
    entry); this reads only the header and is what ``embeddings()`` needs before every call.
    """
    import struct

    def read(fmt):
        size = struct.calcsize(fmt)
        buf = fh.read(size)
        if len(buf) != size:
            raise ValueError("truncated header")
        return struct.unpack(fmt, buf)[0]

    def string():
        n = read("<Q")
        return fh.read(n).decode("utf-8", errors="replace")

    def value(vtype):
        if vtype in _SCALAR:
            return read(_SCALAR[vtype])
        if vtype == 8:
            return string()
        if vtype == 9:
            itype, count = read("<I"), read("<Q")
            if itype in _SCALAR:
                fh.seek(count * struct.calcsize(_SCALAR[itype]), 1)
            else:
                for _ in range(count):
                    value(itype)
            return None
        raise ValueError(f"unknown value type {vtype}")

    out = {}
    try:
        with open(path, "rb") as fh:
            if fh.read(4) != b"GGUF" or read("<I") < 2:
                raise ValueError("not a GGUF v2+ file")
            read("<Q")  # tensor count
            for _ in range(read("<Q")):
                key = string()
                out[key] = value(read("<I"))
    except (OSError, ValueError, struct.error) as e:
        raise MPSearchError(f"{path} is not a readable GGUF file: {e}") from None
    return out


def _gguf_meta(path) -> dict:
    kv = _gguf_kv(path)
    arch = kv.get("general.architecture") or ""
    return {"arch": arch, "n_ctx": kv.get(f"{arch}.context_length"),
            "n_embd": kv.get(f"{arch}.embedding_length"), "pooling": kv.get(f"{arch}.pooling_type")}


def gguf_tensors(path) -> dict[str, dict]:
    """name -> {"type": "q4_0", "shape": torch-order list, "n_bytes", "n_elements"} for a GGUF file."""
    gguf, r = _reader(path)
    out = {}
    for t in r.tensors:
        try:
            tname = gguf.GGMLQuantizationType(int(t.tensor_type)).name.lower()
        except ValueError:
            tname = f"type{int(t.tensor_type)}"
        out[t.name] = {"type": tname, "shape": [int(d) for d in reversed(t.shape.tolist())],
                       "n_bytes": int(t.n_bytes), "n_elements": int(t.n_elements)}
    return out


def gguf_size(path_or_tensors) -> tuple[int, int, float]:
    """(tensor bytes, elements, bits per weight = 8 * bytes / elements), as llama.cpp reports BPW, of a GGUF
    file or of what ``gguf_tensors`` read from one."""
    found = path_or_tensors if isinstance(path_or_tensors, dict) else gguf_tensors(path_or_tensors)
    tensors = found.values()
    n_bytes = sum(t["n_bytes"] for t in tensors)
    n_el = sum(t["n_elements"] for t in tensors)
    return n_bytes, n_el, (8.0 * n_bytes / n_el if n_el else 0.0)


# -- command line ----------------------------------------------------------------------------

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mpsearch.exporters.llama_runtime",
                                 description=f"llama.cpp tools (llama-cpp-python {LLAMA_CPP_PYTHON}) for mpsearch")
    sub = ap.add_subparsers(dest="cmd", required=True)
    ins = sub.add_parser("install", help="fetch the converter and build llama-quantize")
    ins.add_argument("--no-quantize", action="store_true", help="only the converter: no C++ build")
    ins.add_argument("--dest", type=Path, default=None, help=f"install folder (default {tools_dir()})")
    ins.add_argument("--sdist", type=Path, default=None, help=f"a local {SDIST}.tar.gz instead of pip download")
    ins.add_argument("--jobs", type=int, default=None, help="parallel compile jobs (default: the CPUs available)")
    conv = sub.add_parser("convert", help="a Hugging Face model folder as a GGUF, by llama.cpp's converter")
    conv.add_argument("model_dir", type=Path)
    conv.add_argument("out", type=Path)
    conv.add_argument("--outtype", default="f32", help="f32 (default: what the gguf export needs), f16, bf16, q8_0")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "convert":
            print(convert_hf(args.model_dir, args.out, args.outtype))
            return 0
        dest = install(build_quantize=not args.no_quantize, dest=args.dest, sdist=args.sdist, jobs=args.jobs)
    except MPSearchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; run the install again", file=sys.stderr)
        return 130
    print(dest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
