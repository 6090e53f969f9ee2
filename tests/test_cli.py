"""python -m fastattn: the main job and the benchmark table run and report."""
import json
import subprocess
import sys

import pytest


def run(*args):
    return subprocess.run([sys.executable, "-m", "fastattn", *args], capture_output=True, text=True,
                          timeout=600)


def test_main_job_checks_and_times():
    res = run("--shape", "1", "2", "128", "32", "--repeat", "1")
    assert res.returncode == 0, res.stderr
    assert "kernel path" in res.stdout
    assert "FAILED" not in res.stdout
    assert res.stdout.count(": ok") >= 1
    assert "non-causal GFLOP/s" in res.stdout and "speedup" in res.stdout


def test_bench_table_and_json(tmp_path):
    path = tmp_path / "bench.json"
    res = run("bench", "--shape", "1", "2", "128", "32", "--repeat", "1", "--no-torch",
              "--json", str(path), "--threads", "1")
    assert res.returncode == 0, res.stderr
    assert "% matmul" in res.stdout and "GFLOP/s" in res.stdout
    data = json.loads(path.read_text())
    assert data["threads"] == 1 and data["matmul_gflops"] > 0
    assert [r["causal"] for r in data["prefill"]] == [False, True]
    assert all(r["fastattn_ms"] > 0 and r["numpy_ms"] > 0 for r in data["prefill"])


def test_config_command():
    res = run("config")
    assert res.returncode == 0 and "thread pool" in res.stdout


def test_bench_plot(tmp_path):
    import pytest

    pytest.importorskip("matplotlib")
    path = tmp_path / "scaling.png"
    res = run("bench", "--plot", str(path), "--shape", "1", "2", "128", "32", "--shape", "1", "2", "256", "32",
              "--repeat", "1", "--no-torch", "--threads", "1")
    assert res.returncode == 0, res.stderr
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "[1/4]" in res.stderr  # progress lines


def test_linear_bench_runs(monkeypatch):
    from fastattn import _bench

    rows = _bench.run_linear([64, 300], [16], threads=1, repeat=1)
    assert [r["L"] for r in rows] == [64, 300]
    assert "linear ms" in _bench.format_linear(rows)


def test_half_bench_runs():
    from fastattn import _bench

    rows = _bench.run_half(1, repeat=1, prefill_shape=(1, 2, 128, 32), decode_shapes=[(1, 4, 2, 1, 32, 300)])
    assert [r["kind"] for r in rows] == ["prefill", "prefill", "decode"]
    assert all(r[f"{dt}_ms"] > 0 for r in rows for dt in ("float32", "bfloat16", "float16"))
    assert "bfloat16 ms" in _bench.format_half(rows)


def test_decode_bench_runs():
    from fastattn import _bench

    rows = _bench.run_decode([(1, 4, 2, 1, 32, 300)], threads=1, repeat=1, with_torch=False)
    assert rows[0]["fastattn_ms"] > 0 and rows[0]["matvec_ms"] > 0
    assert rows[0]["bytes"] == 2 * 2 * 300 * 32 * 4
    assert "% matvec" in _bench.format_decode(rows)


def test_backward_bench_runs():
    from fastattn import _bench

    rows = _bench.run_backward(1, repeat=1, shapes=[((1, 4, 2, 70, 16), True)], with_torch=False)
    assert [r["dtype"] for r in rows] == ["float32", "bfloat16"]
    assert all(r["fastattn_ms"] > 0 and r["backward_ms"] > 0 for r in rows)
    assert "bwd GFLOP/s" in _bench.format_backward(rows, 100.0)


def test_backward_bench_quick_times_the_quick_shapes_only(monkeypatch, capsys):
    """bench --backward --quick: the quick shapes, full and causal, without
    the packed and option tables (which --quick used to leave in, with the
    full table's shapes: ten minutes on two cores)."""
    from fastattn import __main__ as cli
    from fastattn import _bench

    monkeypatch.setattr(_bench, "QUICK_SHAPES", [(1, 2, 70, 16)])
    monkeypatch.setattr(_bench, "MATMUL_N", 256)
    blocks = _bench.alternating_blocks
    monkeypatch.setattr(_bench, "alternating_blocks", lambda fns, repeat, rounds: blocks(fns, repeat, 1, settle=0))
    extra = []
    monkeypatch.setattr(_bench, "run_packed_backward", lambda *a, **k: extra.append("packed") or [])
    monkeypatch.setattr(_bench, "run_training_options", lambda *a, **k: extra.append("options") or [])
    assert cli.main(["bench", "--backward", "--quick", "--no-torch", "--threads", "1", "--repeat", "2",
                     "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "(1, 2, 2, 70, 16)" in out and out.count("(1, 2, 2, 70, 16)") == 4  # full, causal x 2 dtypes
    assert extra == []


def test_packed_backward_bench_runs():
    """The packed training rows, with torch's two ways where torch is installed."""
    from fastattn import _bench

    with_torch = _bench.torch_sdpa() is not None
    rows = _bench.run_packed_backward(1, repeat=1, rounds=1, cases=[((3, 40), 4, 2, 16)], with_torch=with_torch)
    assert rows[0]["fastattn_ms"] > 0 and (not with_torch or rows[0]["torch_mask_ms"] > 0 < rows[0]["torch_loop_ms"])
    assert "torch mask ms" in _bench.format_packed_backward(rows)


def test_training_options_bench_runs():
    """The training rows of dropout and a learned bias: with and without
    the option, and torch's where installed."""
    from fastattn import _bench

    with_torch = _bench.torch_sdpa() is not None
    rows = _bench.run_training_options(1, repeat=1, rounds=1, with_torch=with_torch,
                                       cases=[("dropout", (1, 2, 40, 16), True), ("learned bias", (2, 2, 33, 8), False)])
    for r in rows:
        assert r["fastattn_ms"] > 0 < r["without_ms"] and (not with_torch or r["torch_ms"] > 0)
    assert "learned bias" in _bench.format_training_options(rows)


def test_transformers_bench_runs(monkeypatch):
    pytest.importorskip("torch", reason="needs torch (pip install 'fastattn[transformers]')")
    pytest.importorskip("transformers", reason="needs transformers (pip install 'fastattn[transformers]')")
    from fastattn import _bench

    monkeypatch.setattr(_bench, "TRANSFORMERS_MODEL", (1, 64, 4, 2, 128, 100))
    rows = _bench.run_transformers(1, prompt=40, new_tokens=3, repeat=1)
    assert [r["phase"] for r in rows] == ["prefill", "decode"]
    assert all(r["fastattn_attention_ms"] > 0 and r["sdpa_attention_ms"] > 0 for r in rows)
    assert "attention x" in _bench.format_transformers(rows)


def test_calls_bench_runs():
    """The per-call rows: every front end timed for each case and thread
    count (the numpy functions; torch's and transformers' columns where they
    are installed)."""
    from fastattn import _bench

    rows = _bench.run_calls(2, repeat=1, cases=[("tiny", (1, 4, 1, 16), (1, 2, 5, 16))])
    assert [r["threads"] for r in rows] == [1, 2]
    keys = ["numpy_us", "varlen_us", "paged_us"]
    try:
        import torch  # noqa: F401
        keys += ["fastattn_torch_us", "torch_us"]
        import transformers  # noqa: F401
        keys += ["hf_fastattn_us", "hf_sdpa_us"]
    except ImportError:
        pass
    assert all(r[k] > 0 for r in rows for k in keys)
    assert "numpy us" in _bench.format_calls(rows)


def test_block_bench_runs():
    """The transformer-block rows: every part timed inside and alone, the
    numpy block also with OpenBLAS on its own threads when it shares
    fastattn's, and sharing back on afterwards."""
    import fastattn
    from fastattn import _bench

    shared = fastattn.thread_pool_info()["blas_shared"]
    rows = _bench.run_block(2, repeat=1, with_torch=False, shape=(64, 48, 3))
    assert len(rows) == (2 if shared else 1)
    assert all(p["inside_ms"] > 0 and p["alone_ms"] > 0 for r in rows for p in r["parts"])
    # every library shared before is shared again (sharing back on may also
    # take in an OpenBLAS loaded meanwhile, e.g. scipy's)
    assert set(shared) <= set(fastattn.thread_pool_info()["blas_shared"])
    assert "inside/alone" in _bench.format_block(rows)


def test_dask_bench_runs():
    pytest.importorskip("dask.array", reason="needs dask (pip install 'fastattn[dask]')")
    from fastattn import _bench

    rows = _bench.run_dask(1, shape=(1, 2, 256, 16), chunk=64, repeat=1, cluster=False)
    assert [r["tasks"] for r in rows] == [1, 10]
    assert "vs one process" in _bench.format_dask(rows)


def test_benchmark_suite_without_pytest_benchmark_is_skipped():
    import os

    bench = os.path.join(os.path.dirname(__file__), os.pardir, "bench")
    if not os.path.isdir(bench):
        pytest.skip("no bench/ beside the tests")
    res = subprocess.run([sys.executable, "-m", "pytest", bench, "-q", "-p", "no:benchmark", "-p", "no:cacheprovider"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:]
    assert "skipped" in res.stdout and "pip install -e '.[bench]'" in res.stdout and "error" not in res.stdout


def test_masks_bench_runs():
    from fastattn import _bench

    rows = _bench.run_masks(1, cases=[((1, 2, 128, 16), "random 50% + causal"), ((1, 2, 256, 16), "8 documents")],
                            repeat=1, with_torch=False)
    assert [r["mask"] for r in rows] == ["random 50% + causal", "8 documents"]
    assert all(r["bool_ms"] > 0 and r["float_ms"] > 0 and r["bf16_ms"] > 0 and r["block_ms"] > 0 and r["none_ms"] > 0
               for r in rows)
    assert "bool/float" in _bench.format_masks(rows)


def test_paged_bench_runs(monkeypatch):
    from fastattn import _bench

    monkeypatch.setattr(_bench, "PAGED_HEADS", (4, 2, 16))
    monkeypatch.setattr(_bench, "PAGED_MIXED", (2, 64, 128, 16, 64))
    blocks = _bench.alternating_blocks
    monkeypatch.setattr(_bench, "alternating_blocks", lambda fns, repeat: blocks(fns, repeat, rounds=1, settle=0))
    monkeypatch.setattr(_bench, "median_time", lambda fn, repeat: (fn(), 1e-3)[1])
    rows, mixed = _bench.run_paged(1, repeat=1, cases=[(256, 1, 16), (256, 3, 32)], with_torch=False)
    assert [(r["lk"], r["batch"], r["block"]) for r in rows] == [(256, 1, 16), (256, 3, 32)]
    assert all(r["paged_ms"] > 0 and r["contiguous_ms"] > 0 for r in rows)
    assert all(r[k] > 0 for r in rows for k in ("int8_ms", "e4m3_ms", "bf16_ms", "int8_hm_ms", "bf16_hm_ms"))
    assert mixed["fastattn_ms"] > 0 and "torch_ms" not in mixed
    assert "paged/contig" in _bench.format_paged(rows, mixed)
