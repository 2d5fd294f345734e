"""shoal's C kernels on their own, on every build this machine runs: exact against a float64 reference, and
a row's bits independent of the batch."""

import pytest
import torch

from shoal.kernels.build import ISA_FLAGS, compiler, isa_runs, load_library
from shoal.kernels.cpu import bind, gemm, pack_weight

BUILDS = [isa for isa in ISA_FLAGS if isa_runs(isa)] if compiler() else []  # without a compiler: torch only


@pytest.fixture(scope="module", params=BUILDS)
def kernel(request):
    library = load_library(request.param)
    assert library is not None, f"the {request.param} build runs here but failed to compile (see the log)"
    return bind(library)


@pytest.mark.parametrize(("n", "k"), [(40, 24), (96, 64), (50, 7), (16, 576)])
def test_gemm_gives_each_row_the_same_bits_for_any_row_count_and_thread_count(kernel, n, k):
    g = torch.Generator().manual_seed(n * k)
    weight, bias, x = (
        torch.randn(n, k, generator=g),
        torch.randn(n, generator=g),
        torch.randn(40, k, generator=g),
    )
    packed = pack_weight(weight, bias)
    full = gemm(kernel, x, packed)
    reference = x.double() @ weight.double().T + bias.double()
    torch.testing.assert_close(full.double(), reference, rtol=1e-5, atol=1e-5)
    for m in range(1, 40):  # every tile shape and remainder, at the start and at the end of the batch
        assert torch.equal(gemm(kernel, x[:m], packed), full[:m]), m
        assert torch.equal(gemm(kernel, x[40 - m :], packed), full[40 - m :]), m
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert torch.equal(gemm(kernel, x, packed), full)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(gemm(kernel, x[:5], pack_weight(weight)) + bias, full[:5])  # the bias is added last


def test_layer_ops_match_torch_and_do_not_depend_on_the_batch(kernel):
    from shoal.kernels.cpu import gated_activation_c, head_norm_c, rms_norm_c, rope_store_c
    from shoal.kernels.torch_ops import apply_rope, rms_norm, write_kv

    g = torch.Generator().manual_seed(1)
    x, weight = torch.randn(9, 72, generator=g), torch.randn(72, generator=g)
    normed = rms_norm_c(kernel, x, weight, 1e-5)
    torch.testing.assert_close(normed, rms_norm(x, weight, 1e-5), rtol=1e-5, atol=1e-6)
    assert torch.equal(rms_norm_c(kernel, x[4:6].contiguous(), weight, 1e-5), normed[4:6])

    gate_up = torch.randn(9, 2 * 44, generator=g) * 4
    gate, up = gate_up.chunk(2, dim=-1)
    silu = gated_activation_c(kernel, gate_up, "silu")
    torch.testing.assert_close(silu, torch.nn.functional.silu(gate) * up)
    gelu = gated_activation_c(kernel, gate_up, "gelu_tanh")
    torch.testing.assert_close(gelu, torch.nn.functional.gelu(gate, approximate="tanh") * up)
    for rows in (slice(0, 1), slice(3, 9)):  # each row on its own
        part = gate_up[rows].contiguous()
        assert torch.equal(gated_activation_c(kernel, part, "silu"), silu[rows])
        assert torch.equal(gated_activation_c(kernel, part, "gelu_tanh"), gelu[rows])

    heads, kv_heads, d, block = 4, 2, 16, 8
    qkv = torch.randn(9, (heads + 2 * kv_heads) * d, generator=g)
    angles = torch.rand(9, d // 2, generator=g) * 6
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    slots = torch.randperm(5 * block, generator=g)[:9]
    caches = [torch.zeros(5, kv_heads, block, d) for _ in range(4)]
    q, k, v = qkv.split([heads * d, kv_heads * d, kv_heads * d], dim=-1)
    q_ref = apply_rope(q.reshape(9, heads, d), cos[:, None], sin[:, None])
    k_ref = apply_rope(k.reshape(9, kv_heads, d), cos[:, None], sin[:, None])
    write_kv(caches[2], caches[3], k_ref, v.reshape(9, kv_heads, d), slots)
    fused = qkv.clone()
    rope_store_c(kernel, fused, cos, sin, caches[0], caches[1], slots, heads)
    assert torch.equal(
        fused[:, : heads * d].view(9, heads, d), q_ref
    )  # the same operations, in the same order
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])

    q_norm, k_norm = torch.randn(d, generator=g), torch.randn(d, generator=g)
    normed_heads = qkv.clone()
    head_norm_c(kernel, normed_heads, q_norm, k_norm, heads, kv_heads, 1e-6)
    q_out, k_out, v_out = normed_heads.split([heads * d, kv_heads * d, kv_heads * d], dim=-1)
    expected_q = rms_norm(q.reshape(9, heads, d), q_norm, 1e-6)
    expected_k = rms_norm(k.reshape(9, kv_heads, d), k_norm, 1e-6)
    torch.testing.assert_close(q_out.reshape(9, heads, d), expected_q, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(k_out.reshape(9, kv_heads, d), expected_k, rtol=1e-5, atol=1e-6)
    assert torch.equal(v_out, v)  # v as it was


@pytest.mark.skipif(compiler() is None, reason="needs a C compiler")
def test_a_source_that_does_not_compile_is_reported_with_the_compilers_words(tmp_path, monkeypatch):
    """The sources compile in parallel, one process each: one failing fails the build, with its errors."""
    from shoal.kernels import build

    broken = tmp_path / "broken.c"
    broken.write_text("int f(void) { return missing_name; }\n")
    monkeypatch.setattr(build, "SOURCES", [*build.SOURCES, broken])
    quick = [*build.BASE_FLAGS, "-O0"]  # what is tested is the compiling, not the code
    error = build._compile(compiler(), quick, tmp_path, tmp_path / "k.so")
    assert error is not None and "missing_name" in error
    assert not (tmp_path / "k.so").exists()
    monkeypatch.setattr(build, "SOURCES", build.SOURCES[:-1])
    assert build._compile(compiler(), quick, tmp_path, tmp_path / "k.so") is None
    assert (tmp_path / "k.so").stat().st_size > 0


@pytest.mark.parametrize(
    ("tokens", "experts", "top_k", "normalize"), [(1, 128, 8, True), (37, 8, 2, False), (300, 60, 4, True)]
)
def test_the_c_router_chooses_as_torch_does(kernel, tokens, experts, top_k, normalize):
    """experts.c's router against Backend.route (torch's softmax, topk and stable sort, as transformers routes):
    the same assignments in the same order, the weights within float32 rounding of a softmax."""
    from shoal.kernels.backend import Backend, CpuBackend

    be = CpuBackend(kernel, "test", "float32")
    logits = torch.randn(tokens, experts, generator=torch.Generator().manual_seed(tokens)) * 3
    c, reference = be.route(logits, top_k, normalize), Backend.route(be, logits, top_k, normalize)
    assert torch.equal(c.rows, reference.rows) and torch.equal(c.starts, reference.starts)
    assert c.most == reference.most == int((c.starts[1:] - c.starts[:-1]).max())
    torch.testing.assert_close(c.weights, reference.weights, rtol=1e-6, atol=0)
    sums = torch.zeros(tokens).index_add_(0, c.rows, c.weights)
    assert torch.allclose(sums, torch.ones(tokens)) if normalize else bool((sums < 1).all())


@pytest.mark.parametrize("precision", ["float32", "int8"])
def test_the_experts_call_gives_the_bits_of_the_composed_operations_whatever_the_batch(kernel, precision):
    """experts.c runs a layer's active experts in one call; Backend.experts composes the same GEMMs and
    activation per expert. Equal bits, both ways experts.c shares the work among threads, and a row's
    result the same alone as among others."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    from shoal.kernels.backend import Backend, CpuBackend, Routing
    from shoal.kernels.formats import QuantizedTensor

    be = CpuBackend(kernel, "test", precision)
    g = torch.Generator().manual_seed(3)
    hidden, inter, experts, top_k = 64, 32, 6, 2

    def q8(rows: int, cols: int) -> QuantizedTensor:
        values = (torch.randn(rows, cols, generator=g) * 0.3).numpy()
        return QuantizedTensor(
            quantize(values, GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0, (rows, cols)
        )

    gate_ups = [be.pack([q8(inter, hidden), q8(inter, hidden)]) for _ in range(experts)]
    downs = [be.pack([q8(hidden, inter)]) for _ in range(experts)]
    group = be.expert_group(gate_ups, downs, "silu")

    def routing(x: torch.Tensor) -> Routing:
        chosen = torch.stack([torch.randperm(experts, generator=g)[:top_k] for _ in range(len(x))])
        weights = torch.rand(len(x), top_k, generator=g)
        flat = chosen.flatten()
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=experts)
        starts = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
        return Routing(order // top_k, weights.flatten()[order], starts, int(counts.max()))

    # 11 rows: each thread runs whole experts (decode); 600 rows, 1,200 assignments: the experts one after
    # another, each GEMM split among the threads (prefill). A row alone runs the first way.
    x = torch.randn(600, hidden, generator=g)
    route = routing(x)
    fused = be.experts(x, group, route)
    assert torch.equal(fused, Backend.experts(be, x, group, route))
    assert fused.abs().max() > 0.1
    few = x[:11]
    assert torch.equal(be.experts(few, group, r := routing(few)), Backend.experts(be, few, group, r))
    for row in (0, 5, 599):  # the row alone, routed to the same experts with the same weights
        mine = [i for i in range(len(route.rows)) if route.rows[i] == row]
        alone = Routing(
            torch.zeros(len(mine), dtype=torch.long),
            route.weights[mine],
            torch.tensor([sum(1 for i in mine if i < route.starts[e]) for e in range(experts + 1)]),
            1,
        )
        assert torch.equal(be.experts(x[row : row + 1], group, alone)[0], fused[row]), row


def test_the_fused_layers_scratch_is_kept_per_thread():
    """cpu.Workspace: a layer's scratch comes back from call to call (a fresh buffer past glibc's mmap
    threshold would be mapped and faulted in at every layer), grown when a call needs more, and a second
    thread (a second engine on the same model) gets a buffer of its own."""
    import threading

    from shoal.kernels.cpu import Workspace

    workspace = Workspace()
    first = workspace.floats(1000)
    assert first.numel() >= 1000
    assert workspace.floats(10).data_ptr() == first.data_ptr()
    grown = workspace.floats(5000)
    assert grown.numel() >= 5000 and workspace.floats(5000).data_ptr() == grown.data_ptr()
    other = []
    thread = threading.Thread(target=lambda: other.append(workspace.floats(10).data_ptr()))
    thread.start()
    thread.join()
    assert other[0] != grown.data_ptr()
    assert workspace.floats(10).data_ptr() == grown.data_ptr()


@pytest.mark.parametrize("kv_dtype", [torch.float16, torch.bfloat16])
def test_attention_gives_a_row_the_same_bits_alone_in_a_batch_and_from_any_cache_type(kernel, kv_dtype):
    """A decode row alone (few tasks: one query head each, every thread busy) and the same row among many
    (a task per KV head and its query heads) give the same bits; a 16-bit cache, read and widened in
    registers, gives the bits of a float32 cache holding the same values; so do 1 and 2 threads."""
    import types

    from shoal.kernels.cpu import attention_c

    g = torch.Generator().manual_seed(5)
    heads, kv_heads, d, block = 9, 3, 64, 16
    positions = [700, 5, 16, 300, 699, 31, 64, 128]
    tables, offsets = [], []
    for p in positions:  # every row its own blocks, scattered over the pool
        offsets.append(len(tables))
        tables.extend(range(len(tables), len(tables) + p // block + 1))
    order = torch.randperm(len(tables), generator=g)
    pool = [torch.randn(len(tables), kv_heads, block, d, generator=g).to(kv_dtype) for _ in range(2)]
    qkv = torch.randn(len(positions), (heads + 2 * kv_heads) * d, generator=g)

    def attend(rows: list[int], caches) -> torch.Tensor:
        flat, starts = [], []
        for r in rows:
            starts.append(len(flat))
            end = offsets[r + 1] if r + 1 < len(offsets) else len(tables)
            flat.extend(order[offsets[r] : end].tolist())
        meta = types.SimpleNamespace(
            row_table_offset=torch.tensor(starts),
            tables=torch.tensor(flat),
            row_positions=torch.tensor([positions[r] for r in rows]),
        )
        return attention_c(kernel, qkv[rows].contiguous(), *caches, meta, heads, d**-0.5, 0)

    everything = list(range(len(positions)))
    batch = attend(everything, pool)
    assert batch.abs().max() > 0.1
    wide = [c.float() for c in pool]
    assert torch.equal(attend(everything, wide), batch)
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            for row in (0, 3):
                assert torch.equal(attend([row], pool)[0], batch[row]), (n, row)
                assert torch.equal(attend([row], wide)[0], batch[row]), (n, row)
    finally:
        torch.set_num_threads(threads)


def prefill_case(heads: int, kv_heads: int, d: int, window: int, kv_dtype: torch.dtype):
    """Rows of two prefill chunks (the second not at a block's start), a decode row and two padding rows, each
    sequence's KV blocks scattered over a pool; and attend(lib, rows): those rows' attention."""
    import types

    from shoal.kernels.cpu import attention_c

    g = torch.Generator().manual_seed(heads * d + window)
    block = 16
    tables, offsets, positions = [], [], []
    for start, n in [(0, 70), (50, 150), (300, 1)]:  # (first position, rows) per sequence
        offsets += [len(tables)] * n
        positions += list(range(start, start + n))
        tables += torch.randperm(400, generator=g)[: (start + n) // block + 1].tolist()
    offsets, positions = offsets + [0, 0], positions + [-1, -1]
    pool = [torch.randn(400, kv_heads, block, d, generator=g).to(kv_dtype) for _ in range(2)]
    qkv = torch.randn(len(positions), (heads + 2 * kv_heads) * d, generator=g)

    def attend(lib, rows: list[int]) -> torch.Tensor:
        meta = types.SimpleNamespace(
            row_table_offset=torch.tensor([offsets[r] for r in rows]),
            tables=torch.tensor(tables),
            row_positions=torch.tensor([positions[r] for r in rows]),
        )
        return attention_c(lib, qkv[rows].contiguous(), *pool, meta, heads, d**-0.5, window)

    return types.SimpleNamespace(
        positions=positions, offsets=offsets, tables=tables, pool=pool, qkv=qkv, block=block, attend=attend
    )


@pytest.mark.parametrize(
    ("heads", "kv_heads", "d", "window"),
    [(9, 3, 64, 0), (8, 8, 32, 0), (14, 2, 64, 37), (8, 1, 128, 0), (6, 2, 48, 0), (8, 8, 32, 2)],
)
@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.float16])
def test_a_prefills_rows_read_together_keep_each_rows_bits(kernel, heads, kv_heads, d, window, kv_dtype):
    """A prefill's rows (one sequence's consecutive positions) are read in blocks that share each key and value:
    every row, in such a block, next to decode and padding rows, gives the bits it gives alone (a decode row of
    its own), with 1 or 2 threads; and all of them match a float64 reference (causal, or a sliding window)."""
    case = prefill_case(heads, kv_heads, d, window, kv_dtype)
    everything = list(range(len(case.positions)))
    batch = case.attend(kernel, everything)
    for r, p in enumerate(case.positions):  # float64 reference
        if p < 0:
            assert torch.equal(batch[r], torch.zeros(heads * d))
            continue
        keys = range(max(0, p - window + 1) if window else 0, p + 1)
        slots = [(case.tables[case.offsets[r] + j // case.block], j % case.block) for j in keys]
        # [keys, kv_heads, d]
        k, v = (torch.stack([c[b, :, s] for b, s in slots]).double() for c in case.pool)
        q = case.qkv[r, : heads * d].view(heads, d).double()
        group = heads // kv_heads
        scores = torch.einsum("hd,khd->hk", q, k.repeat_interleave(group, 1)) * d**-0.5
        want = torch.einsum("hk,khd->hd", scores.softmax(-1), v.repeat_interleave(group, 1)).reshape(-1)
        torch.testing.assert_close(batch[r].double(), want, rtol=1e-5, atol=1e-5)
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            assert torch.equal(case.attend(kernel, everything), batch), n
            # ends and middles of the chunks' blocks, the decode row; then other block boundaries, and a padding
            # row before position 0 of the table at offset 0 (the two must not be read as one sequence)
            for r in [0, 1, 7, 63, 64, 69, 70, 71, 219, 220]:
                assert torch.equal(case.attend(kernel, [r])[0], batch[r]), (n, r)
            assert torch.equal(case.attend(kernel, everything[10:90]), batch[10:90]), n
            assert torch.equal(case.attend(kernel, [221, 0, 1, 2]), batch[[221, 0, 1, 2]]), n
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("d", [48, 64, 128])
def test_every_vector_build_gives_the_same_attention_bits(d):
    """AVX2, AVX-512 (2 queries a vector) and AMX builds: the same chains, so the same bits on any x86 machine
    (the portable build sums each score in one chain instead of 8 lanes)."""
    builds = [isa for isa in BUILDS if isa != "portable"]
    if len(builds) < 2:
        pytest.skip("fewer than two vector builds run here")
    case = prefill_case(8, 2, d, 0, torch.float16)
    rows = list(range(len(case.positions)))
    first, *others = [case.attend(bind(load_library(isa)), rows) for isa in builds]
    for isa, got in zip(builds[1:], others, strict=True):
        assert torch.equal(got, first), isa
