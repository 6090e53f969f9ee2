"""Properties of the kernel building blocks."""
import io
import os
import platform
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import fastattn
from fastattn import _config, _core

# The vectorised float32 exp of every path: relative error at most 1e-7
# (1.7 units of 2**-24) wherever exp(x) is a normal float; -inf gives 0 and
# NaN stays NaN.  Below the normal range the vector paths give 0 (the kernels
# flush subnormals: on Intel CPUs each cost a microcode assist); the generic
# path's exp is libm's, flushed by the kernels' floating-point mode instead.
EXP_MAX_REL_ERROR = 1e-7


@pytest.mark.parametrize("isa", fastattn.available_isas())
def test_exp_accuracy(isa):
    index = _config.ISA_NAMES.index(isa)
    x = np.concatenate([
        np.linspace(-87.0, 0.0, 1_000_003, dtype=np.float32),
        -np.logspace(-9, 0, 10_001, dtype=np.float32),
        np.array([0.0, -0.0], np.float32),
    ])
    y = np.empty_like(x)
    _core.exp_f32(index, x, y)
    expected = np.exp(x.astype(np.float64))
    rel = np.abs(y - expected) / expected
    assert rel.max() <= EXP_MAX_REL_ERROR, rel.max()
    special = np.array([-np.inf, np.nan, -200.0, -1e30, -87.4, -95.0, -103.0], np.float32)
    ys = np.empty_like(special)
    _core.exp_f32(index, special, ys)
    assert ys[0] == 0 and np.isnan(ys[1]) and ys[2] == 0 and ys[3] == 0
    if isa != "generic":
        assert np.all(ys[4:] == 0), ys[4:]


PEAK_WORKLOADS = {
    # prefill: (1, 2, 8192, 64) float32; an Lq x Lk score matrix would be
    # 256 MiB for one head, 512 MiB for both
    "prefill": """
        q, k, v = (rng.standard_normal((1, 2, 8192, 64), dtype=np.float32) for _ in range(3))
        out = np.empty_like(q)
        run = lambda: fastattn.attention(q, k, v, out=out)
    """,
    # decode: 32 query heads on 8 kv heads against a 16384-key cache (split-KV)
    "decode": """
        q = rng.standard_normal((1, 32, 1, 128), dtype=np.float32)
        k, v = (rng.standard_normal((1, 8, 16384, 128), dtype=np.float32) for _ in range(2))
        out = np.empty_like(q)
        run = lambda: fastattn.attention(q, k, v, causal=True, out=out)
    """,
    # backward: (1, 2, 8192, 64) float32 causal, gradients written in place
    # (out is a stand-in: the gradients' pages are touched before measuring)
    "backward": """
        q, k, v, dout = (rng.standard_normal((1, 2, 8192, 64), dtype=np.float32) for _ in range(4))
        o, lse = fastattn.attention(q, k, v, causal=True, return_lse=True)
        dq, dk, dv = (np.zeros_like(a) for a in (q, k, v))
        out = np.zeros(0)
        run = lambda: fastattn.attention_backward(dout, q, k, v, o, lse, causal=True, dq=dq, dk=dk, dv=dv)
    """,
    # varlen: 16384 packed tokens in 3 sequences, 8 heads
    "varlen": """
        cu = np.array([0, 1000, 9000, 16384])
        q, k, v = (rng.standard_normal((16384, 8, 64), dtype=np.float32) for _ in range(3))
        out = np.empty_like(q)
        run = lambda: fastattn.attention_varlen(q, k, v, cu, cu, causal=True, out=out)
    """,
}


def peak_mib(workload):
    """Peak RSS growth (MiB) beyond `out` while the workload's run() runs, in a subprocess."""
    code = textwrap.dedent(
        """
        import resource, numpy as np, fastattn
        rng = np.random.default_rng(0)
        """
    ) + textwrap.dedent(workload) + textwrap.dedent(
        """
        out_mib = out.nbytes / 2**20
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        run()
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print((after - before) / 1024 - out_mib)
        """
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=dict(os.environ))
    return float(res.stdout.strip())


@pytest.mark.parametrize("workload", sorted(PEAK_WORKLOADS))
def test_peak_memory_is_independent_of_lq_times_lk(workload):
    """Peak RSS grows by less than 64 MiB beyond the output while attention runs."""
    # out's pages are first written by the kernel, so its size is subtracted;
    # what remains is the kernel's scratch and partial results
    assert peak_mib(PEAK_WORKLOADS[workload]) < 64


@pytest.mark.slow
def test_backward_peak_memory_at_16384():
    """The (1, 8, 16384, 64) float32 backward (causal, gradients written in
    place) grows the peak RSS by less than 64 MiB: its dq accumulators and
    query-tile packs (rounds of at most 32 MiB: 2 heads of 12 MiB) and
    scratch; one head's score matrix alone would be 1 GiB."""
    assert peak_mib(PEAK_WORKLOADS["backward"].replace("(1, 2, 8192, 64)", "(1, 8, 16384, 64)")) < 64


# ---- the typed boundary --------------------------------------------------------


def _problem_fields(**over):
    """The fields of a valid 1-entry float32 attention problem over q = k = v
    (3 x 4) and out, as _core.Problem takes them."""
    x = np.arange(12, dtype=np.float32).reshape(3, 4) / 10
    out = np.zeros_like(x)
    entries = np.zeros((1, _core.ENTRY_FIELDS), np.int64)
    entries[0, _core.E_LQ] = entries[0, _core.E_LK] = 3
    addr = x.__array_interface__["data"][0]
    fields = dict(dtype=_core.DTYPE_F32, kv_dtype=_core.DTYPE_F32, path=0, num_threads=1, entries=entries,
                  d=4, dv=4, q=addr, q_rs=16, q_cs=4, k=addr, k_rs=16, k_cs=4, v=addr, v_rs=16, v_cs=4,
                  out=out.__array_interface__["data"][0], out_rs=16, out_cs=4, scale=0.5, keep=(x, out))
    fields.update(over)
    return fields, x, out


def test_problem_is_filled_by_name_and_runs():
    fields, x, out = _problem_fields()
    _core.attention(_core.Problem(**fields))
    import fastattn.reference as ref

    np.testing.assert_allclose(out, ref.attention(x, x, x, scale=0.5), rtol=1e-6, atol=1e-6)


def test_problem_rejects_unknown_and_missing_fields():
    fields, _, _ = _problem_fields()
    with pytest.raises(TypeError, match="q_stride"):
        _core.Problem(**fields, q_stride=4)
    del fields["entries"]
    with pytest.raises(TypeError, match="entries"):
        _core.Problem(**fields)
    with pytest.raises(TypeError):
        _core.attention(None)


def test_kernel_refuses_what_it_cannot_run():
    fields, _, out = _problem_fields(kv_dtype=_core.DTYPE_F64)
    with pytest.raises(TypeError, match="combination of element types"):
        _core.attention(_core.Problem(**fields))
    assert not out.any()
    fields, _, _ = _problem_fields(path=len(_config.PATHS))
    with pytest.raises(RuntimeError, match="kernel path"):
        _core.attention(_core.Problem(**fields))


# ---- kernel paths ----------------------------------------------------------------


def test_paths_are_chosen_by_capability():
    names = [p[0] for p in _config.PATHS]
    assert names[0] == "generic" and _config.PATHS[0][1] == "any" and _config.PATHS[0][3]
    supported = fastattn.available_isas()
    assert supported == [p[0] for p in _config.PATHS if p[3]]
    # the default is the last path of the table this CPU supports
    assert fastattn.get_isa() == supported[-1] or os.environ.get("FASTATTN_ISA")
    for name, arch, features, ok in _config.PATHS[1:]:
        assert arch in ("x86_64", "aarch64") and features
    text = io.StringIO()
    fastattn.show_config(file=text)
    for name, arch, _, ok in _config.PATHS:
        assert re.search(rf"^\s+{name}\s+{arch}; .*; {'yes' if ok else 'no'}$", text.getvalue(), re.M), name


def test_the_architecture_s_own_path_is_preferred():
    names = [p[0] for p in _config.PATHS]
    machine = platform.machine().lower()
    if machine in ("aarch64", "arm64"):
        assert names == ["generic", "neon"]
    elif machine in ("x86_64", "amd64"):
        assert names == ["generic", "avx2", "avx512", "avx512bf16"]
    else:
        assert names == ["generic"]
    if not os.environ.get("FASTATTN_ISA"):
        assert fastattn.get_isa() == fastattn.available_isas()[-1]


@pytest.mark.parametrize("name", fastattn.available_isas())
def test_each_call_is_counted_on_the_path_it_ran_on(name):
    q = np.ones((2, 5, 8), np.float32)
    before = _config.path_runs()
    with fastattn.use_isa(name):
        fastattn.attention(q, q, q)
        fastattn.scores(q, q)
        fastattn.weighted_sum(q[..., :5], q)
    after = _config.path_runs()
    assert {n: after[n] - before[n] for n in after} == {n: 3 if n == name else 0 for n in after}


def test_fastattn_isa_names_the_path():
    name = fastattn.available_isas()[0]
    env = dict(os.environ, FASTATTN_ISA=name.upper())
    code = "import fastattn; print(fastattn.get_isa())"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert res.stdout.strip() == name


def test_address_is_that_of_element_zero():
    import ml_dtypes

    base = np.zeros((6, 8), ml_dtypes.bfloat16)
    for a in (base, base[::-1, ::2], base[3:, 5:], np.zeros(0, np.float32), base.T):
        assert _core.address(a) == a.__array_interface__["data"][0]
    with pytest.raises(TypeError, match="numpy.ndarray"):
        _core.address(memoryview(b"abc"))
