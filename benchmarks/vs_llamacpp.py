"""shoal against llama.cpp on the same GGUF files, side by side, in one run.

Finds llama.cpp's `llama-batched-bench` and `llama-quantize` (on PATH, under --llama-cpp DIR, or in the
build this script made before), or builds them from the `llama-cpp-python` sdist, which vendors llama.cpp.
Makes a Q8_0 copy of the default model with llama-quantize, then runs both engines on each file at batch
1, 4, 16 and 64 (32-token prompts, 64 new tokens, 2 threads): decode and prefill tokens/s with the ratio
shoal / llama.cpp, and each engine's peak RSS. Writes benchmarks/results/vs_llamacpp.json.

Run it on an idle machine: llama.cpp's threads spin, and any other load distorts its figures badly.
Never run in CI. Without a compiler or cmake, llama.cpp is skipped with a message and shoal runs alone.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from machine import cpu_flags, cpu_name

ROOT = Path(__file__).resolve().parent.parent
BATCHES = (1, 4, 16, 64)
PROMPT, NEW_TOKENS = 32, 64
BUILD_DIR = Path(os.environ.get("SHOAL_CACHE_DIR", Path.home() / ".cache" / "shoal")) / "llama.cpp"
TOOLS = ("llama-batched-bench", "llama-quantize")


# ---- llama.cpp: find or build ----


def find_tools(extra: Path | None) -> dict[str, str] | None:
    for folder in [extra, BUILD_DIR / "build" / "bin"]:
        if folder and all((folder / t).is_file() for t in TOOLS):
            return {t: str(folder / t) for t in TOOLS}
    found = {t: shutil.which(t) for t in TOOLS}
    return found if all(found.values()) else None


def cmake_flags() -> list[str]:
    """Explicit instruction sets where the CPU lists AMX: GGML_NATIVE builds crashed there on quantized files."""
    flags = cpu_flags()
    if "amx_tile" not in flags:
        return ["-DGGML_NATIVE=ON"]
    explicit = ["-DGGML_NATIVE=OFF", "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON"]
    if "avx512f" in flags:
        explicit += ["-DGGML_AVX512=ON", "-DGGML_AVX512_VBMI=ON", "-DGGML_AVX512_VNNI=ON"]
    if "avx512_bf16" in flags:
        explicit.append("-DGGML_AVX512_BF16=ON")
    return explicit + ["-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"]


def build_llama_cpp() -> dict[str, str] | None:
    if not (shutil.which("cmake") and (shutil.which("cc") or shutil.which("gcc"))):
        print("llama.cpp skipped: building it needs cmake and a C/C++ compiler")
        return None
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    source = BUILD_DIR / "src"
    if not (source / "CMakeLists.txt").is_file():
        with tempfile.TemporaryDirectory() as tmp:
            print("downloading the llama-cpp-python sdist (it vendors llama.cpp) ...", flush=True)
            got = subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", tmp,
                 "llama-cpp-python"],
                capture_output=True, text=True,
            )  # fmt: skip
            archives = list(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
            if got.returncode != 0 or not archives:
                print(f"llama.cpp skipped: could not download llama-cpp-python's sdist\n{got.stderr[-2000:]}")
                return None
            with tarfile.open(archives[0]) as tar:
                tar.extractall(tmp, filter="data")
            vendored = next(Path(tmp).glob("llama_cpp_python-*/vendor/llama.cpp"))
            shutil.rmtree(source, ignore_errors=True)
            shutil.copytree(vendored, source)
    build = BUILD_DIR / "build"
    configure = ["cmake", "-S", str(source), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                 "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_EXAMPLES=ON", "-DLLAMA_BUILD_TESTS=OFF",
                 "-DLLAMA_CURL=OFF", "-DBUILD_SHARED_LIBS=OFF", *cmake_flags()]  # fmt: skip
    print("building llama.cpp (about 10 minutes on 2 cores):", " ".join(configure[6:]), flush=True)
    for command in (
        configure,
        ["cmake", "--build", str(build), "-j", str(os.cpu_count() or 2), "--target", *TOOLS],
    ):
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            print(f"llama.cpp skipped: {' '.join(command[:3])} failed\n{result.stderr[-3000:]}")
            return None
    return find_tools(None)


# ---- running a command and taking its peak RSS ----


def run_measured(command: list[str], log: Path) -> tuple[int, float]:
    """Runs command with output to log; returns (exit status, peak RSS in MiB) of that process alone."""
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    return process.returncode, usage.ru_maxrss / 1024


def llama_cpp_run(tools: dict[str, str], model: str, threads: int, log: Path) -> dict:
    command = [tools["llama-batched-bench"], "-m", model, "-c", "8192", "-b", "2048", "-ub", "512",
               "-npp", str(PROMPT), "-ntg", str(NEW_TOKENS), "-npl", ",".join(map(str, BATCHES)),
               "-t", str(threads), "-kvu"]  # fmt: skip
    status, rss = run_measured(command, log)
    if status != 0:
        print(f"llama-batched-bench failed on {model} (exit {status}); see {log}")
        return {}
    rows = {}
    for line in log.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 8 and cells[0].isdigit():
            batch = int(cells[2])
            rows[batch] = {"prefill": float(cells[5]), "decode": float(cells[7])}
    return {"rss_mib": rss, "batches": rows}


# ---- shoal, in a child process of its own (for its peak RSS) ----


def shoal_child(model: str, threads: int, kv_memory: int) -> None:
    import random

    import shoal
    from shoal.engine.request import OutputKind

    llm = shoal.LLM(model, kv_cache_memory=kv_memory, num_threads=threads, max_num_seqs=64)
    engine, vocab = llm.engine, llm.model.config.vocab_size
    params = shoal.SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)

    def measure(batch: int, seed: int) -> dict:
        rng = random.Random(seed)
        for i in range(batch):
            prompt = [rng.randrange(100, vocab - 100) for _ in range(PROMPT)]
            engine.add_request(prompt, params, f"{seed}-{i}", output_kind=OutputKind.CUMULATIVE)
        start, started, first = time.perf_counter(), set(), None
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.outputs and out.outputs[0].token_ids:
                    started.add(out.request_id)
            if first is None and len(started) == batch:
                first = time.perf_counter()
        end = time.perf_counter()
        return {
            "prefill": batch * PROMPT / (first - start),
            "decode": batch * (NEW_TOKENS - 1) / (end - first),
        }

    measure(4, seed=999)  # warm-up: kernels compiled, caches filled
    rows = {batch: measure(batch, seed=batch) for batch in BATCHES}
    print("SHOAL_RESULT " + json.dumps({"batches": rows, "weights": llm.model.describe_weights()}))


def shoal_run(model: str, threads: int, kv_memory: int, log: Path) -> dict:
    command = [sys.executable, __file__, "--child", model, "--threads", str(threads), "--kv", str(kv_memory)]
    status, rss = run_measured(command, log)
    text = log.read_text()
    match = re.search(r"^SHOAL_RESULT (.*)$", text, re.MULTILINE)
    if status != 0 or not match:
        print(f"shoal failed on {model} (exit {status}); see {log}")
        return {}
    result = json.loads(match.group(1))
    result["batches"] = {int(b): v for b, v in result["batches"].items()}
    return {"rss_mib": rss, **result}


# ---- the report ----


def report(name: str, size_mib: float, ours: dict, theirs: dict) -> None:
    print(f"\n{name} ({size_mib:.0f} MiB file)" + (f"; shoal keeps {ours['weights']}" if ours else ""))
    print(
        f"{'batch':>5} | {'decode shoal':>12} {'llama.cpp':>9} {'ratio':>6} | {'prefill shoal':>13} {'llama.cpp':>9} {'ratio':>6}"
    )
    for batch in BATCHES:
        a, b = ours.get("batches", {}).get(batch, {}), theirs.get("batches", {}).get(batch, {})
        cells = []
        for key in ("decode", "prefill"):
            x, y = a.get(key), b.get(key)
            ratio = f"{x / y:5.2f}x" if x and y else "     -"
            cells.append(
                f"{x or 0:12.1f} {y or 0:9.1f} {ratio:>6}"
                if key == "decode"
                else f"{x or 0:13.1f} {y or 0:9.1f} {ratio:>6}"
            )
        print(f"{batch:>5} | {cells[0]} | {cells[1]}")
    rss = [
        f"shoal {ours['rss_mib']:.0f} MiB" if ours else "",
        f"llama.cpp {theirs['rss_mib']:.0f} MiB" if theirs else "",
    ]
    print("peak RSS: " + ", ".join(r for r in rss if r))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--llama-cpp", type=Path, help="folder holding llama-batched-bench and llama-quantize"
    )
    parser.add_argument("--model", help="a GGUF file (default: the default model, plus its Q8_0 copy)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--kv", type=int, default=320 << 20, help="shoal's KV pool in bytes (holds 64 x 96 tokens)"
    )
    parser.add_argument("--skip-llama-cpp", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        shoal_child(args.child, args.threads, args.kv)
        return

    from shoal.models.loader import default_model_path

    out_dir = ROOT / "benchmarks" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    tools = None if args.skip_llama_cpp else (find_tools(args.llama_cpp) or build_llama_cpp())
    models = [args.model] if args.model else [default_model_path()]
    if tools and not args.model:
        q8 = out_dir / "SmolLM2-135M-Instruct.Q8_0.gguf"
        if not q8.is_file():
            subprocess.run([tools["llama-quantize"], "--allow-requantize", models[0], str(q8), "Q8_0"],
                           check=True, capture_output=True)  # fmt: skip
        models.append(str(q8))
    print(f"CPU: {cpu_name()}; {args.threads} threads; prompt {PROMPT}, {NEW_TOKENS} new tokens")
    results = {
        "cpu": cpu_name(),
        "threads": args.threads,
        "prompt": PROMPT,
        "new_tokens": NEW_TOKENS,
        "files": {},
    }
    for model in models:
        name = Path(model).name
        ours = shoal_run(model, args.threads, args.kv, out_dir / f"{name}.shoal.log")
        theirs = llama_cpp_run(tools, model, args.threads, out_dir / f"{name}.llama.log") if tools else {}
        size = Path(model).stat().st_size / 2**20
        report(name, size, ours, theirs)
        results["files"][name] = {"file_mib": size, "shoal": ours, "llama_cpp": theirs}
    (out_dir / "vs_llamacpp.json").write_text(json.dumps(results, indent=2))
    print(f"\nwrote {out_dir / 'vs_llamacpp.json'}")


if __name__ == "__main__":
    main()
