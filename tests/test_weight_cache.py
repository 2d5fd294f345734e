"""A GGUF file's packed weights are saved once and mapped by later loads: the same logits without
repacking, a new cache when the file changes, nothing saved when it is turned off, and one copy of the
weights shared by two processes."""

from __future__ import annotations

import inspect
import logging
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from test_quantized_models import prompt_ids, shoal_logits
from tiny_models import make_tiny_hf_model, write_gguf

import shoal
from shoal.kernels.build import compiler

pytestmark = pytest.mark.skipif(compiler() is None, reason="the cache holds the C kernels' layout")
MIX = {"v_proj": "Q6_K", "down_proj": "Q6_K"}


@pytest.fixture(scope="module")
def wide_dir(tmp_path_factory) -> str:
    return make_tiny_hf_model(
        "qwen3", tmp_path_factory.mktemp("wide") / "m", hidden_size=256, intermediate_size=512
    )


def caches(path: str) -> list[Path]:
    return sorted(Path(path).parent.glob(Path(path).name + ".shoal-*.packed"))


def test_the_second_load_maps_the_saved_weights_and_gives_the_same_logits(wide_dir, tmp_path, caplog):
    path = write_gguf(wide_dir, tmp_path / "m.gguf", "Q4_K", MIX)
    first = shoal.load_model(path)
    [cache] = caches(path)
    with caplog.at_level(logging.INFO, logger="shoal"):
        second = shoal.load_model(path)
    assert any("no repacking" in r.getMessage() for r in caplog.records)
    qkv = second.module.layers[0].attn.qkv
    assert qkv.format_name == "q4+q6"
    mapped = Path("/proc/self/maps").read_text()
    assert str(cache) in mapped  # the weights are the file's pages, not a copy
    ids = prompt_ids(first)
    assert torch.equal(shoal_logits(second, ids, chunks=[17, 9]), shoal_logits(first, ids, chunks=[17, 9]))


def mapped_kib(name_end: str) -> dict[str, int]:
    """This process's resident and proportional KiB ("Rss", "Pss") over its mappings of files whose path ends
    with name_end, read at one moment."""
    total, inside = {"Rss": 0, "Pss": 0}, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if line[:1].isalnum() and "-" in line.split()[0]:
            inside = line.rstrip().endswith(name_end)
        elif inside and line.split(":")[0] in total:
            total[line.split(":")[0]] += int(line.split()[1])
    return total


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="reads /proc/self/smaps")
def test_a_load_from_the_cache_maps_every_page_before_the_first_step(wide_dir, tmp_path):
    """As llama.cpp's MAP_POPULATE: no page is left to map on its first use (a mixture of experts' first use
    of an expert cost about twice its read that way)."""
    path = write_gguf(wide_dir, tmp_path / "m.gguf", "Q4_K", MIX)
    shoal.load_model(path)  # saves the cache
    [cache] = caches(path)
    _model = shoal.load_model(path)  # held: its weights are the mapping measured
    assert mapped_kib(str(cache))["Rss"] >= 0.9 * cache.stat().st_size / 1024


def test_int8_precision_from_the_cache_is_int8_precision_packed_afresh(wide_dir, tmp_path):
    """The cache holds the layout only: precision="int8" applies to mapped weights as to fresh ones, and a
    float32 load of the same cache stays float32."""
    path = write_gguf(wide_dir, tmp_path / "m.gguf", "Q4_K", MIX)
    fresh = shoal.load_model(path, precision="int8", weight_cache=False)
    shoal.load_model(path)  # writes the cache
    mapped = shoal.load_model(path, precision="int8")
    assert mapped.backend.describe(mapped.module.layers[0].attn.qkv) == "q4+q6 x int8"
    ids = prompt_ids(fresh)
    int8 = shoal_logits(mapped, ids, chunks=[17, 9])
    assert torch.equal(int8, shoal_logits(fresh, ids, chunks=[17, 9]))
    assert not torch.equal(int8, shoal_logits(shoal.load_model(path), ids, chunks=[17, 9]))


def test_a_changed_file_is_packed_again_and_its_old_cache_removed(wide_dir, tmp_path):
    path = write_gguf(wide_dir, tmp_path / "m.gguf", "Q8_0")
    shoal.load_model(path)
    [old] = caches(path)
    other = make_tiny_hf_model("qwen3", tmp_path / "other", hidden_size=256, intermediate_size=512, seed=5)
    write_gguf(other, path, "Q8_0")  # the same size, other weights
    reloaded = shoal.load_model(path)
    [new] = caches(path)
    assert new != old
    fresh = shoal.load_model(path, weight_cache=False)
    ids = prompt_ids(fresh)
    assert torch.equal(shoal_logits(reloaded, ids, chunks=[9]), shoal_logits(fresh, ids, chunks=[9]))


def test_turned_off_nothing_is_saved(wide_dir, tmp_path):
    path = write_gguf(wide_dir, tmp_path / "m.gguf", "Q8_0")
    shoal.load_model(path, weight_cache=False)
    assert caches(path) == []


SHARER = (
    textwrap.dedent(
        """
    import sys, time
    from pathlib import Path
    import shoal
    """
    )
    + inspect.getsource(mapped_kib)
    + textwrap.dedent(
        """
    model = shoal.load_model(sys.argv[1])
    for linear in model.module.linears:  # every weight read once, as a forward pass reads them
        for part in linear.parts():
            for t in (part.quants, part.scales, part.mins, part.high, part.super_scales, part.super_mins):
                if t is not None:
                    t.view(-1)[:: 512].tolist()
    Path(sys.argv[2]).touch()
    while not Path(sys.argv[3]).exists():
        time.sleep(0.05)
    kib = mapped_kib(".packed")
    print(kib["Rss"], kib["Pss"], model.weight_bytes // 1024)
    """
    )
)


def test_two_processes_share_one_copy_of_the_weights(wide_dir, tmp_path):
    path = write_gguf(wide_dir, tmp_path / "m.gguf", "Q4_K", MIX)
    shoal.load_model(path)  # saves the cache
    script = tmp_path / "sharer.py"
    script.write_text(SHARER)
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), path, str(tmp_path / f"ready{i}"), str(go)],
            stdout=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for i in range(2)
    ]
    try:
        for i in range(2):
            for _ in range(1200):
                if (tmp_path / f"ready{i}").exists():
                    break
                time.sleep(0.05)
        go.touch()
        answers = [p.communicate(timeout=120)[0].split() for p in procs]
    finally:
        for p in procs:
            p.kill()
    for rss, pss, weights in ([int(v) for v in a] for a in answers):
        assert rss >= 0.5 * weights  # the weights are resident through the cache's mapping
        assert pss <= 0.75 * rss  # and each process is charged about half: one copy for both


def test_a_truncated_cache_is_ignored_and_replaced(wide_dir, tmp_path):
    path = write_gguf(wide_dir, tmp_path / "m.gguf", "Q8_0")
    first = shoal.load_model(path)
    [cache] = caches(path)
    cache.write_bytes(cache.read_bytes()[: cache.stat().st_size // 2])
    again = shoal.load_model(path)
    ids = prompt_ids(first)
    assert torch.equal(shoal_logits(again, ids, chunks=[9]), shoal_logits(first, ids, chunks=[9]))
    assert caches(path) == [cache] and cache.stat().st_size > 0
