"""shoal against llama.cpp on the same GGUF files, side by side, in one run.

Finds llama.cpp's `llama-batched-bench` and `llama-quantize` (on PATH, under --llama-cpp DIR, or in the
build this script made before), or builds them from the `llama-cpp-python` sdist, which vendors llama.cpp.
The files: the default model and its Q8_0 copy (made with llama-quantize); or --model FILE; or, with
--shape qwen3-8b --type q6_k (or qwen2.5-0.5b, q4_k_m, q8_0), a random-weight file of that model's exact
shape, made once and cached (gguf_shapes.py; --layers N keeps N of its layers, for a quicker run).
--isa avx2 limits both engines to AVX2, FMA and F16C, as an AVX2-only CPU runs them (shoal's avx2 kernel build,
llama.cpp built without AVX-512 in a folder of its own): the figures of that code on this machine's memory.
Both engines run each file at batch 1, 4, 16 and 64 (--batches 1,16: those; 32-token prompts, 64 new
tokens, 2 threads) and at batch 1 after a 2,048-token prompt; each is run twice (--runs N: N times,
alternating) and its best figures kept (llama.cpp's batch-1 speed varies between runs). llama.cpp runs with
its default KV layout (not -kvu, which is slower from 16 up). shoal's prefill is counted as llama-batched-bench
counts its prompt processing: the batch's prompts to their first token, with no decode step in the window. Printed: decode and prefill
tokens/s with the ratio shoal / llama.cpp, both engines' peak RSS, and the batch-1 bandwidth limit (this
machine's read bandwidth over the bytes each token reads). shoal runs once per --precision (default both:
float32, its default and transformers' numbers, and int8, activations in int8 as llama.cpp computes).
Writes benchmarks/results/vs_llamacpp.json.

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

from gguf_shapes import SHAPES, TYPES, random_gguf
from machine import cpu_flags, cpu_name

ROOT = Path(__file__).resolve().parent.parent
BATCHES = (1, 4, 16, 64)
PROMPT, NEW_TOKENS = 32, 64
LONG_PROMPT = 2048
RUNS = 2  # each engine's best of, by default
BUILD_DIR = Path(os.environ.get("SHOAL_CACHE_DIR", Path.home() / ".cache" / "shoal")) / "llama.cpp"
TOOLS = ("llama-batched-bench", "llama-quantize")


# ---- llama.cpp: find or build ----


def build_folder(isa: str | None) -> Path:
    return BUILD_DIR / ("build" if isa is None else f"build-{isa}")


def find_tools(extra: Path | None, isa: str | None) -> dict[str, str] | None:
    for folder in [extra, build_folder(isa) / "bin"]:
        if folder and all((folder / t).is_file() for t in TOOLS):
            return {t: str(folder / t) for t in TOOLS}
    found = {t: shutil.which(t) for t in TOOLS}
    return found if all(found.values()) and isa is None else None


def cmake_flags(isa: str | None) -> list[str]:
    """Explicit instruction sets where the CPU lists AMX, with llama.cpp's AMX off: built with it (natively or by
    these flags plus GGML_AMX_*=ON), llama-batched-bench dies of SIGILL on quantized files at its AMX kernel's first
    tile instruction (seen on a 2-core Xeon KVM guest: tilezero in tinygemm_kernel_amx<block_q8_K, block_q6_K>).
    isa "avx2": AVX2, FMA and F16C only."""
    flags = cpu_flags()
    if "amx_tile" not in flags and isa is None:
        return ["-DGGML_NATIVE=ON"]
    explicit = ["-DGGML_NATIVE=OFF", "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON"]
    if isa == "avx2":
        off = ("AVX512", "AVX_VNNI", "AMX_TILE", "AMX_INT8")
        return explicit + [f"-DGGML_{name}=OFF" for name in off]
    if "avx512f" in flags:
        explicit += ["-DGGML_AVX512=ON", "-DGGML_AVX512_VBMI=ON", "-DGGML_AVX512_VNNI=ON"]
    if "avx512_bf16" in flags:
        explicit.append("-DGGML_AVX512_BF16=ON")
    return explicit + ["-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"]


def build_llama_cpp(isa: str | None) -> dict[str, str] | None:
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
    build = build_folder(isa)
    configure = ["cmake", "-S", str(source), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                 "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_EXAMPLES=ON", "-DLLAMA_BUILD_TESTS=OFF",
                 "-DLLAMA_CURL=OFF", "-DBUILD_SHARED_LIBS=OFF", *cmake_flags(isa)]  # fmt: skip
    print("building llama.cpp (about 10 minutes on 2 cores):", " ".join(configure[6:]), flush=True)
    for command in (
        configure,
        ["cmake", "--build", str(build), "-j", str(os.cpu_count() or 2), "--target", *TOOLS],
    ):
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            print(f"llama.cpp skipped: {' '.join(command[:3])} failed\n{result.stderr[-3000:]}")
            return None
    return find_tools(None, isa)


# ---- running a command and taking its peak RSS ----


def run_measured(command: list[str], log: Path) -> tuple[int, float]:
    """Runs command with output to log; returns (exit status, peak RSS in MiB) of that process alone."""
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    return process.returncode, usage.ru_maxrss / 1024


def llama_cpp_run(tools: dict[str, str], model: str, threads: int, batches: list[int], log: Path) -> dict:
    """Both runs of llama-batched-bench (the batches, then the long prompt), with its default KV layout."""
    runs = [
        (["-c", "8192", "-npp", str(PROMPT), "-npl", ",".join(map(str, batches))], "batches"),
        (["-c", str(LONG_PROMPT + NEW_TOKENS + 64), "-npp", str(LONG_PROMPT), "-npl", "1"], "long"),
    ]
    result: dict = {"rss_mib": 0.0}
    for options, key in runs:
        command = [tools["llama-batched-bench"], "-m", model, "-b", "2048", "-ub", "512", "-ntg",
                   str(NEW_TOKENS), "-t", str(threads), *options]  # fmt: skip
        status, rss = run_measured(command, log)
        if status != 0:
            print(f"llama-batched-bench failed on {model} (exit {status}); see {log}")
            return {}
        result["rss_mib"] = max(result["rss_mib"], rss)
        rows = {}
        for line in log.read_text().splitlines():
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if len(cells) >= 8 and cells[0].isdigit():
                rows[int(cells[2])] = {"prefill": float(cells[5]), "decode": float(cells[7])}
        result[key] = rows if key == "batches" else rows.get(1, {})
    return result


# ---- shoal, in a child process of its own (for its peak RSS) ----


def shoal_child(
    model: str, threads: int, kv_memory: int, precision: str, kernels: str, batches: list[int]
) -> None:
    """Load time, the batches and the long prompt, printed as one SHOAL_RESULT line."""
    import random

    import shoal
    from shoal.engine.request import OutputKind

    loading = time.perf_counter()
    llm = shoal.LLM(
        model,
        kv_cache_memory=kv_memory,
        num_threads=threads,
        max_num_seqs=64,
        precision=precision,
        kernels=kernels,
    )
    load_s = time.perf_counter() - loading
    engine, vocab = llm.engine, llm.model.config.vocab_size
    params = shoal.SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)

    def add(batch: int, seed: int, prompt_len: int, sampling: shoal.SamplingParams) -> None:
        rng = random.Random(seed)
        for i in range(batch):
            prompt = [rng.randrange(100, vocab - 100) for _ in range(prompt_len)]
            engine.add_request(prompt, sampling, f"{seed}-{i}", output_kind=OutputKind.CUMULATIVE)

    def prefill(batch: int, seed: int, prompt_len: int) -> float:
        """Prompt tokens/s as llama-batched-bench counts them: every prompt to its first token, no decode
        step in the window (each request stops at one token)."""
        add(batch, seed, prompt_len, shoal.SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
        start = time.perf_counter()
        while engine.has_unfinished_requests():
            engine.step()
        return batch * prompt_len / (time.perf_counter() - start)

    def decode(batch: int, seed: int, prompt_len: int) -> float:
        """Tokens/s from the moment every sequence has its first token, counting only the tokens made after."""
        add(batch, seed, prompt_len, params)
        made: dict[str, int] = {}
        at_first = first = None
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.outputs and out.outputs[0].token_ids:
                    made[out.request_id] = len(out.outputs[0].token_ids)
            if first is None and len(made) == batch:
                first, at_first = time.perf_counter(), sum(made.values())
        return (sum(made.values()) - at_first) / (time.perf_counter() - first)

    def measure(batch: int, seed: int, prompt_len: int = PROMPT) -> dict:
        # Different seeds for the two passes: the second must not find the first's prompt in the cache.
        return {
            "prefill": prefill(batch, seed, prompt_len),
            "decode": decode(batch, seed + 10_000, prompt_len),
        }

    measure(4, seed=999)  # warm-up: kernels compiled, caches filled
    rows = {batch: measure(batch, seed=batch) for batch in batches}
    long = measure(1, seed=2048, prompt_len=LONG_PROMPT)
    described = llm.model.describe_weights()
    print("SHOAL_RESULT " + json.dumps({"batches": rows, "long": long, "weights": described,
                                        "weight_bytes": llm.model.weight_bytes, "load_s": load_s,
                                        "bytes_per_token": llm.model.module.bytes_per_token}))  # fmt: skip


def shoal_run(
    model: str, threads: int, kv_memory: int, precision: str, kernels: str, batches: list[int], log: Path
) -> dict:
    command = [sys.executable, __file__, "--child", model, "--threads", str(threads), "--kv", str(kv_memory),
               "--precision", precision, "--kernels", kernels, "--batches", ",".join(map(str, batches))]  # fmt: skip
    status, rss = run_measured(command, log)
    text = log.read_text()
    match = re.search(r"^SHOAL_RESULT (.*)$", text, re.MULTILINE)
    if status != 0 or not match:
        print(f"shoal failed on {model} (exit {status}); see {log}")
        return {}
    result = json.loads(match.group(1))
    result["batches"] = {int(b): v for b, v in result["batches"].items()}
    return {"rss_mib": rss, **result}


def best_of(runs: list[dict], batches: list[int]) -> dict:
    """Each figure's best over the runs (the machine's noise only ever slows a run down); RSS: the largest."""
    runs = [r for r in runs if r]
    if not runs:
        return {}
    best = {**runs[0], "rss_mib": max(r["rss_mib"] for r in runs)}
    best["batches"] = {
        b: {k: max(r["batches"].get(b, {}).get(k, 0) for r in runs) for k in ("decode", "prefill")}
        for b in batches
    }
    best["long"] = {k: max(r.get("long", {}).get(k, 0) for r in runs) for k in ("decode", "prefill")}
    return best


def kv_memory(model: str) -> int:
    """A KV pool for 64 sequences of 96 tokens and one of the long prompt, from the file's shape (fp32)."""
    from gguf import GGUFReader

    reader = GGUFReader(model)

    def value(key: str) -> int:
        arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
        field = reader.fields.get(f"{arch}.{key}")
        return int(field.parts[-1][0]) if field is not None else 0

    head_dim = value("attention.key_length") or value("embedding_length") // value("attention.head_count")
    per_token = value("block_count") * value("attention.head_count_kv") * head_dim * 2 * 4
    tokens = max(64 * (PROMPT + NEW_TOKENS), LONG_PROMPT + NEW_TOKENS) + 64 * 16
    return int(per_token * tokens * 1.1)


BANDWIDTH_PROBE = """
import sys, time, torch
torch.set_num_threads(int(sys.argv[1]))
data, best = torch.ones(1 << 28), 0.0
for _ in range(5):
    start = time.perf_counter()
    data.sum()
    best = max(best, data.numel() * 4 / (time.perf_counter() - start))
print(best)
"""


def read_bandwidth(threads: int) -> float:
    """Bytes per second this machine reads with `threads` threads (a sum over 1 GiB, best of 5), measured in
    a process of its own: a child's peak RSS starts from its parent's at the fork, so the parent stays small."""
    probe = subprocess.run(
        [sys.executable, "-c", BANDWIDTH_PROBE, str(threads)], capture_output=True, text=True
    )
    return float(probe.stdout.strip())


# ---- the report ----


def report(
    name: str, size_mib: float, ours: dict, theirs: dict, bandwidth: float, batches: list[int]
) -> None:
    print(f"\n{name} ({size_mib:.0f} MiB file)" + (f"; shoal keeps {ours['weights']}" if ours else ""))
    print(
        f"{'batch':>5} | {'decode shoal':>12} {'llama.cpp':>9} {'ratio':>6} | {'prefill shoal':>13} {'llama.cpp':>9} {'ratio':>6}"
    )
    for batch in batches:
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
    a, b = ours.get("long", {}), theirs.get("long", {})
    if a or b:
        ratios = [
            f"{a[k] / b[k]:5.2f}x" if a.get(k) and b.get(k) else "     -" for k in ("decode", "prefill")
        ]
        print(f"{'1 @' + str(LONG_PROMPT):>5} | {a.get('decode', 0):12.1f} {b.get('decode', 0):9.1f} {ratios[0]:>6} | "
              f"{a.get('prefill', 0):13.1f} {b.get('prefill', 0):9.1f} {ratios[1]:>6}")  # fmt: skip
    per_token = ours.get("bytes_per_token") or ours.get("weight_bytes") or size_mib * 2**20
    limit = bandwidth / per_token
    print(f"batch-1 bandwidth limit: {bandwidth / 1e9:.1f} GB/s read / {per_token / 1e9:.2f} GB per token "
          f"= {limit:.1f} tokens/s")  # fmt: skip
    shares = [
        f"{engine} {runs['batches'][1]['decode'] / limit:.0%}"
        for engine, runs in (("shoal", ours), ("llama.cpp", theirs))
        if runs.get("batches", {}).get(1, {}).get("decode")
    ]
    if shares:
        print("batch 1 at that limit: " + ", ".join(shares))
    if ours:
        print(f"shoal: weights {ours['weight_bytes'] / 2**20:.0f} MiB ({ours['weight_bytes'] / 2**20 / size_mib:.3f}x "
              f"the file), loaded in {ours['load_s']:.1f} s")  # fmt: skip
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
    parser.add_argument("--shape", choices=sorted(SHAPES), help="a random-weight file of this model's shape")
    parser.add_argument("--type", choices=sorted(TYPES), default="q4_k_m", help="its quantization")
    parser.add_argument("--layers", type=int, help="keep this many of the shape's layers")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--batches", default=",".join(map(str, BATCHES)), help="batch sizes, comma-separated (1 must be one)"
    )
    parser.add_argument("--kv", type=int, help="shoal's KV pool in bytes (default: 64 x 96 tokens' worth)")
    parser.add_argument("--skip-llama-cpp", action="store_true")
    parser.add_argument(
        "--runs", type=int, default=RUNS, help="runs of each engine, alternating; the best figures are kept"
    )
    parser.add_argument(
        "--precision", default="float32,int8", help="shoal's precision option(s), comma-separated"
    )
    parser.add_argument(
        "--kernels",
        default="auto",
        help="shoal's kernel build: auto (the widest that runs), amx, avx512, ...",
    )
    parser.add_argument(
        "--isa",
        choices=["avx2"],
        help="both engines limited to this instruction set (shoal's build of it, llama.cpp built for it)",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.isa and args.kernels == "auto":
        args.kernels = args.isa
    batches = sorted({int(b) for b in args.batches.split(",")})
    if 1 not in batches:
        parser.error("--batches must include 1 (the bandwidth limit is a batch-1 figure)")
    if args.child:
        kv = args.kv or kv_memory(args.child)
        shoal_child(args.child, args.threads, kv, args.precision, args.kernels, batches)
        return

    from shoal.models.loader import default_model_path

    out_dir = ROOT / "benchmarks" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    tools = None
    if not args.skip_llama_cpp:
        tools = find_tools(args.llama_cpp, args.isa) or build_llama_cpp(args.isa)
    if args.shape and not tools:
        print("--shape needs llama.cpp's llama-quantize")
        return
    if args.shape:
        args.model = str(
            random_gguf(
                args.shape, args.type, args.layers, tools["llama-quantize"], BUILD_DIR.parent / "shapes"
            )
        )
    models = [args.model] if args.model else [default_model_path()]
    if tools and not args.model:
        q8 = out_dir / "SmolLM2-135M-Instruct.Q8_0.gguf"
        if not q8.is_file():
            subprocess.run([tools["llama-quantize"], "--allow-requantize", models[0], str(q8), "Q8_0"],
                           check=True, capture_output=True)  # fmt: skip
        models.append(str(q8))
    bandwidth = read_bandwidth(args.threads)
    print(
        f"CPU: {cpu_name()}; {args.threads} threads; prompt {PROMPT}, {NEW_TOKENS} new tokens; best of {args.runs}"
        + (f"; both engines limited to {args.isa}" if args.isa else "")
    )
    results = {
        "cpu": cpu_name(),
        "threads": args.threads,
        "prompt": PROMPT,
        "new_tokens": NEW_TOKENS,
        "long_prompt": LONG_PROMPT,
        "batches": batches,
        "isa": args.isa,
        "read_bandwidth": bandwidth,
        "files": {},
    }
    for model in models:
        name, kv = Path(model).name, args.kv or kv_memory(model)
        precisions = args.precision.split(",")
        ours: dict[str, list[dict]] = {p: [] for p in precisions}
        theirs = []
        # alternating, so a slow spell of the machine does not fall on one engine only
        for _ in range(args.runs):
            for precision in precisions:
                log = out_dir / f"{name}.shoal-{precision}.log"
                ours[precision].append(
                    shoal_run(model, args.threads, kv, precision, args.kernels, batches, log)
                )
            if tools:
                theirs.append(
                    llama_cpp_run(tools, model, args.threads, batches, out_dir / f"{name}.llama.log")
                )
        theirs = best_of(theirs, batches)
        size = Path(model).stat().st_size / 2**20
        results["files"][name] = {"file_mib": size, "llama_cpp": theirs}
        for precision, runs in ours.items():
            best = best_of(runs, batches)
            report(f"{name}, shoal precision={precision}", size, best, theirs, bandwidth, batches)
            results["files"][name][f"shoal_{precision}"] = best
    (out_dir / "vs_llamacpp.json").write_text(json.dumps(results, indent=2))
    print(f"\nwrote {out_dir / 'vs_llamacpp.json'}")


if __name__ == "__main__":
    main()
