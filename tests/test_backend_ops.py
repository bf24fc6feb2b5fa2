"""Every Backend operation against an independent NumPy reference, on the CPU backend and (tests
marked ``gpu``, skipped without a CUDA build and GPU) on the CUDA backend, which is also compared
with the CPU backend on the same inputs. Includes the row-independence the lossless contract
rests on: a row's result does not depend on the other rows of the call."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import medusa_rt
from medusa_rt import _core
from medusa_rt.errors import InvalidArgumentError

Harness = _core._testing.BackendHarness

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
        medusa_rt.cuda_device_count() == 0, reason="no CUDA backend in this build or no GPU")]),
]


def round_to(a: np.ndarray, dtype: str) -> np.ndarray:
    a = np.asarray(a, dtype=np.float32)
    if dtype == "fp32":
        return a
    if dtype == "fp16":
        return a.astype(np.float16).astype(np.float32)
    u = a.view(np.uint32).astype(np.uint64)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000).astype(np.uint32)  # round to nearest even
    return r.view(np.float32)


def weights_as(w: np.ndarray, dtype: str) -> np.ndarray:
    """The weights a `dtype` matrix multiplies (int8: the NumPy quantizer of the training tools,
    an independent implementation of the backend's)."""
    from medusa_rt.train.heads_np import round_to as runtime_values

    return runtime_values(w, dtype) if dtype == "int8" else round_to(w, dtype)


def arr(x, shape=None) -> np.ndarray:
    a = np.asarray(x, dtype=np.float32)
    return a.reshape(shape) if shape is not None else a


@pytest.fixture(scope="module", params=DEVICES)
def dev(request):
    return request.param


@pytest.fixture(scope="module")
def h(dev):
    return Harness(dev, 2)


@pytest.fixture(scope="module")
def cpu():
    return Harness("cpu", 2)


RNG = np.random.default_rng(5)


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16", "int8"])
@pytest.mark.parametrize("k", [96, 100, 300])
def test_linear(h, dev, dtype, k):
    n, rows = 200, 70
    x = RNG.standard_normal((rows, k)).astype(np.float32)
    w = (RNG.standard_normal((n, k)) * 0.1).astype(np.float32)
    w[3, :] = 0  # an all-zero row: scale 0
    b = RNG.standard_normal(n).astype(np.float32)
    if dev != "cpu" and dtype in ("fp32", "int8"):
        with pytest.raises(InvalidArgumentError, match="bf16 or fp16"):
            h.linear(x.ravel(), rows, w.ravel(), n, k, dtype, [])
        return
    y = arr(h.linear(x.ravel(), rows, w.ravel(), n, k, dtype, b), (rows, n))
    # The CPU multiplies fp32 activations; CUDA's tensor cores take them rounded to the weights' type.
    xin = x if dev == "cpu" else round_to(x, dtype)
    ref = xin.astype(np.float64) @ weights_as(w, dtype).T.astype(np.float64) + b
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)
    # Row independence: every batch size gives each row the same bits (tree rows = plain rows).
    for m in (1, 3, 17):
        part = arr(h.linear(x[:m].ravel(), m, w.ravel(), n, k, dtype, b), (m, n))
        assert np.array_equal(part, y[:m])
    one = arr(h.linear(x[40:41].ravel(), 1, w.ravel(), n, k, dtype, b), (1, n))
    assert np.array_equal(one, y[40:41])


@pytest.mark.parametrize("k", [96, 101, 600])
def test_linear_bf16_inputs(k):
    """matmul_inputs="bf16" (CPUs with AVX512-BF16): bf16 weights times the inputs rounded to
    bf16, accumulated in fp32; odd k, partial panels and row blocks; each row the same bits
    whatever the batch (tree rows = plain rows)."""
    try:
        h = Harness("cpu-bf16-inputs", 2)
    except InvalidArgumentError as e:
        pytest.skip(str(e))
    n, rows = 200, 70
    x = RNG.standard_normal((rows, k)).astype(np.float32)
    w = (RNG.standard_normal((n, k)) * 0.1).astype(np.float32)
    b = RNG.standard_normal(n).astype(np.float32)
    y = arr(h.linear(x.ravel(), rows, w.ravel(), n, k, "bf16", b), (rows, n))
    ref = round_to(x, "bf16").astype(np.float64) @ round_to(w, "bf16").T.astype(np.float64) + b
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)
    for m in (1, 3, 9, 17):
        assert np.array_equal(arr(h.linear(x[:m].ravel(), m, w.ravel(), n, k, "bf16", b), (m, n)), y[:m])
    assert np.array_equal(arr(h.linear(x[40:41].ravel(), 1, w.ravel(), n, k, "bf16", b), (1, n)), y[40:41])


_ISA_GEMM = """
import sys, numpy as np
from medusa_rt import _core
h = _core._testing.BackendHarness("cpu", 2)
rng = np.random.default_rng(11)
n, k = 200, 300                      # k > 256: the AVX-512 many-row path blocks k
x = rng.standard_normal((70, k)).astype(np.float32)
w = (rng.standard_normal((n, k)) * 0.1).astype(np.float32)
b = rng.standard_normal(n).astype(np.float32)
out = {}
for dt in ("fp32", "bf16", "fp16", "int8"):
    for m in (1, 2, 3, 5, 7, 8, 13, 70):
        out[f"{dt}-{m}"] = np.asarray(h.linear(x[:m].ravel(), m, w.ravel(), n, k, dt, b), np.float32)
np.savez(sys.argv[1], **out)
print(h.device_name)
"""


def test_linear_same_bits_on_every_isa(tmp_path):
    """Each kernel set the CPU has (MEDUSA_RT_ISA caps the choice per process): the SIMD GEMMs
    give bit-identical results to each other for every row count (one FMA chain per element in
    the same order), each row the same bits whatever the batch; the portable path agrees closely."""
    got = {}
    for isa in ("generic", "avx2", "avx512"):
        env = dict(os.environ, MEDUSA_RT_ISA=isa)
        f = tmp_path / f"{isa}.npz"
        p = subprocess.run([sys.executable, "-c", _ISA_GEMM, str(f)], env=env, capture_output=True, text=True)
        assert p.returncode == 0, p.stderr
        used = p.stdout.strip().rstrip(")").rsplit(" ", 1)[-1]
        got[used] = dict(np.load(f))
    assert "generic" in got
    for isa, out in got.items():
        for key, y in out.items():
            dt, m = key.split("-")
            assert np.array_equal(y.reshape(int(m), -1), out[f"{dt}-70"].reshape(70, -1)[: int(m)]), (isa, key)
    simd = [v for k, v in got.items() if k != "generic"]
    for other in simd[1:]:
        for key in other:
            assert np.array_equal(other[key], simd[0][key]), key
    for key in got["generic"]:
        for out in simd:
            np.testing.assert_allclose(out[key], got["generic"][key], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "int8"])
def test_embed_and_matrix_row(h, dev, dtype):
    if dev != "cpu" and dtype == "int8":
        pytest.skip("int8 weights are CPU-only")
    rows, cols = 50, 36
    t = RNG.standard_normal((rows, cols)).astype(np.float32)
    toks = [3, 0, 49, 3]
    out = arr(h.embed(t.ravel(), rows, cols, dtype, toks), (len(toks) + 1, cols))
    r = weights_as(t, dtype)
    assert np.array_equal(out[:-1], r[toks])
    assert np.array_equal(out[-1], r[-1])


def test_rmsnorm(h):
    x = RNG.standard_normal((5, 96)).astype(np.float32) * 3
    w = RNG.standard_normal(96).astype(np.float32)
    y = arr(h.rmsnorm(x.ravel(), 5, w, 1e-5), (5, 96))
    x64 = x.astype(np.float64)
    ref = w * (x64 / np.sqrt((x64 ** 2).mean(1, keepdims=True) + 1e-5))
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


def test_add_rmsnorm_is_add_then_rmsnorm(h):
    x = RNG.standard_normal((5, 96)).astype(np.float32) * 3
    y = RNG.standard_normal((5, 96)).astype(np.float32)
    w = RNG.standard_normal(96).astype(np.float32)
    got = arr(h.add_rmsnorm(x.ravel(), y.ravel(), 5, w, 1e-5), (2, 5, 96))
    summed = arr(h.add(x.ravel(), y.ravel(), False), (5, 96))
    assert np.array_equal(got[0], summed) and np.array_equal(got[0], x + y)
    assert np.array_equal(got[1], arr(h.rmsnorm(summed.ravel(), 5, w, 1e-5), (5, 96)))


def test_rope(h):
    rows, heads, hd, stride, col0 = 3, 2, 16, 40, 4
    x = RNG.standard_normal((rows, stride)).astype(np.float32)
    pos = [0, 5, 9]
    ang = np.arange(10)[:, None] * (1.0 / 10000 ** (np.arange(hd // 2) * 2 / hd))[None, :]
    cos, sin = np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)
    y = arr(h.rope(x.ravel(), rows, stride, col0, heads, hd, pos, cos.ravel(), sin.ravel()), (rows, stride))
    ref = x.copy()
    for r, p in enumerate(pos):
        for hh in range(heads):
            v = x[r, col0 + hh * hd: col0 + (hh + 1) * hd]
            a, b = v[: hd // 2], v[hd // 2:]
            ref[r, col0 + hh * hd: col0 + (hh + 1) * hd] = np.concatenate([a * cos[p] - b * sin[p], b * cos[p] + a * sin[p]])
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


def test_elementwise(h):
    gu = RNG.standard_normal((4, 2 * 30)).astype(np.float32)
    g, u = gu[:, :30].astype(np.float64), gu[:, 30:]
    np.testing.assert_allclose(arr(h.silu_mul(gu.ravel(), 4), (4, 30)), g / (1 + np.exp(-g)) * u, rtol=1e-5, atol=1e-6)
    x, y = RNG.standard_normal(1000).astype(np.float32), RNG.standard_normal(1000).astype(np.float32)
    assert np.array_equal(arr(h.add(x, y, False)), x + y)
    np.testing.assert_allclose(arr(h.add(x, y, True)), x + y / (1 + np.exp(-y.astype(np.float64))), rtol=1e-5, atol=1e-6)
    idx = [4, 0, 4, 2]
    xs = RNG.standard_normal((5, 33)).astype(np.float32)
    assert np.array_equal(arr(h.gather_rows(xs.ravel(), 33, idx), (4, 33)), xs[idx])


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16", "int8"])
def test_linear_argmax_is_linear_then_argmax(h, dev, dtype):
    """The greedy lm_head (linear fused with argmax) picks exactly the index linear() then
    argmax() picks, ties included (lowest index), across column chunks and threads."""
    if dev != "cpu" and dtype in ("fp32", "int8"):
        pytest.skip("CUDA weights are bf16 or fp16")
    n, k = 3000, 64  # 188 panels, the last one partial: two threads, several chunks each
    for rows in (1, 3, 9, 40):
        x = RNG.standard_normal((rows, k)).astype(np.float32)
        w = RNG.standard_normal((n, k)).astype(np.float32)
        w[7] = 10 * x[0] / np.linalg.norm(x[0])  # row 0's winner by far...
        w[[900, 1600, 2999]] = w[7]  # ...tied in another chunk, on the other thread, in the last panel
        if rows > 2:
            x[2] = 0  # every logit 0: index 0
        ref = np.asarray(h.linear(x.ravel(), rows, w.ravel(), n, k, dtype, [])).reshape(rows, n)
        got = h.linear_argmax(x.ravel(), rows, w.ravel(), n, k, dtype)
        assert got == [int(np.argmax(r)) for r in ref]
        assert got[0] == 7 and (rows < 3 or got[2] == 0)


def test_argmax_topk_ties(h):
    vocab = 3000
    l = RNG.standard_normal((4, vocab)).astype(np.float32)
    l[1, [7, 900, 2999]] = 9.0  # a three-way tie: the lowest index first
    l[2, :] = 0.5
    l[3, :] = -np.inf  # fewer finite logits than k: the -inf ones follow in index order
    l[3, [5, 50, 500]] = [1.0, 3.0, 2.0]
    assert h.argmax(l.ravel(), 4) == [int(np.argmax(l[0])), 7, 0, 50]
    k = 10
    top = np.asarray(h.topk(l.ravel(), 4, k, [])).reshape(4, k)
    for r in range(4):
        ref = sorted(range(vocab), key=lambda i: (-l[r, i], i))[:k]
        assert top[r].tolist() == ref
    id_map = list(range(5000, 5000 + vocab))
    mapped = np.asarray(h.topk(l.ravel(), 4, k, id_map)).reshape(4, k)
    assert np.array_equal(mapped, top + 5000)


def test_softmax_stats(h):
    l = (RNG.standard_normal((3, 500)) * 4).astype(np.float32)
    for t in (1.0, 0.7):
        out = arr(h.softmax_stats(l.ravel(), 3, t))
        z = l.astype(np.float64) / t
        lse = np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) + z.max(1)
        p = np.exp(z - lse[:, None])
        ent = -(p * np.log(p + 1e-5)).sum(1)
        np.testing.assert_allclose(out[:3], lse, rtol=1e-5)
        np.testing.assert_allclose(out[3:], ent, rtol=1e-4, atol=1e-5)


HEADS, KVH, HD, SLOTS, MAXSEQ = 4, 2, 16, 2, 40


def _attention_case():
    width = (HEADS + 2 * KVH) * HD
    kc = RNG.standard_normal(SLOTS * KVH * MAXSEQ * HD).astype(np.float32)
    vc = RNG.standard_normal(kc.size).astype(np.float32)
    rows = 5
    qkv = RNG.standard_normal((rows, width)).astype(np.float32)
    qkv[3, : HEADS * HD] = qkv[2, : HEADS * HD]  # row 3: the same query as row 2, as a tree row
    slots = [0, 1, 1, 1, 0]
    cache_index = [10, 30, 31, 32, 11]
    prefix = [11, 31, 9, 5, 12]
    # Row 3 sees keys 0..4 and then 5..8 as "ancestors": the same 9 keys, in the same order, as
    # row 2's causal prefix (its own K/V are written at 32, which neither sees).
    extra_offsets = [0, 0, 0, 0, 4, 4]
    extra = [5, 6, 7, 8]
    return qkv, rows, width, slots, cache_index, prefix, extra_offsets, extra, kc, vc


def _attention_ref(qkv, slots, cache_index, prefix, extra_offsets, extra, kc, vc):
    k = kc.reshape(SLOTS, KVH, MAXSEQ, HD).copy()
    v = vc.reshape(SLOTS, KVH, MAXSEQ, HD).copy()
    for r in range(len(slots)):
        k[slots[r], :, cache_index[r]] = qkv[r, HEADS * HD:(HEADS + KVH) * HD].reshape(KVH, HD)
        v[slots[r], :, cache_index[r]] = qkv[r, (HEADS + KVH) * HD:].reshape(KVH, HD)
    out = np.zeros((len(slots), HEADS * HD))
    for r in range(len(slots)):
        keys = list(range(prefix[r])) + extra[extra_offsets[r]:extra_offsets[r + 1]]
        for hh in range(HEADS):
            q = qkv[r, hh * HD:(hh + 1) * HD].astype(np.float64)
            kk = k[slots[r], hh // (HEADS // KVH), keys].astype(np.float64)
            s = kk @ q / np.sqrt(HD)
            p = np.exp(s - s.max())
            out[r, hh * HD:(hh + 1) * HD] = (p / p.sum()) @ v[slots[r], hh // (HEADS // KVH), keys]
    return out, k.ravel(), v.ravel()


def test_attention_with_tree_rows(h):
    qkv, rows, width, slots, ci, prefix, eo, extra, kc, vc = _attention_case()
    out, k2, v2 = h.attention(qkv.ravel(), rows, width, HEADS, KVH, MAXSEQ, HD, slots, ci, prefix, eo, extra,
                              HEADS * HD, (HEADS + KVH) * HD, kc, vc)
    out = arr(out, (rows, HEADS * HD))
    ref, kref, vref = _attention_ref(qkv, slots, ci, prefix, eo, extra, kc, vc)
    assert np.array_equal(arr(k2), kref) and np.array_equal(arr(v2), vref)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    assert np.array_equal(out[2], out[3])  # a tree row and a causal row over the same keys


def test_kv_copy_in_order(h):
    layers, kc_shape = 2, (2, SLOTS, KVH, MAXSEQ, HD)
    kc = RNG.standard_normal(int(np.prod(kc_shape))).astype(np.float32)
    vc = RNG.standard_normal(kc.size).astype(np.float32)
    # Compaction order: 5 -> 1, then 2 -> ... copies read entries earlier copies may overwrite.
    slot, src, dst = [1, 1, 1, 0], [5, 1, 7, 3], [1, 2, 3, 1]
    k2, v2 = h.kv_copy(kc, vc, layers, SLOTS, KVH, MAXSEQ, HD, slot, src, dst)
    k = kc.reshape(kc_shape).copy()
    v = vc.reshape(kc_shape).copy()
    for s_, a, b in zip(slot, src, dst):
        k[:, s_, :, b] = k[:, s_, :, a]
        v[:, s_, :, b] = v[:, s_, :, a]
    assert np.array_equal(arr(k2), k.ravel()) and np.array_equal(arr(v2), v.ravel())


@pytest.mark.gpu
@pytest.mark.skipif(medusa_rt.cuda_device_count() == 0, reason="no CUDA backend in this build or no GPU")
def test_cuda_matches_cpu_backend(cpu):
    """The same inputs through both backends (beyond the NumPy references above)."""
    g = Harness("cuda", 1)
    x = RNG.standard_normal((9, 64)).astype(np.float32)
    w = (RNG.standard_normal((130, 64)) * 0.2).astype(np.float32)
    xr = round_to(x, "bf16")  # CUDA rounds GEMM inputs to bf16: give the CPU the same values
    a = arr(g.linear(x.ravel(), 9, w.ravel(), 130, 64, "bf16", []))
    b = arr(cpu.linear(xr.ravel(), 9, w.ravel(), 130, 64, "bf16", []))
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    qkv, rows, width, slots, ci, prefix, eo, extra, kc, vc = _attention_case()
    args = (qkv.ravel(), rows, width, HEADS, KVH, MAXSEQ, HD, slots, ci, prefix, eo, extra, HEADS * HD,
            (HEADS + KVH) * HD, kc, vc)
    np.testing.assert_allclose(arr(g.attention(*args)[0]), arr(cpu.attention(*args)[0]), rtol=1e-5, atol=1e-6)
    l = RNG.standard_normal((4, 2000)).astype(np.float32)
    assert g.argmax(l.ravel(), 4) == cpu.argmax(l.ravel(), 4)
    assert g.topk(l.ravel(), 4, 8, []) == cpu.topk(l.ravel(), 4, 8, [])


# Rows of an attention call: (slot, cache index, prefix, ancestors) each.
_SHORT_ROWS = (
    # a 5-node tree of slot 1 after 150 cached tokens (root, two children, a grandchild of each);
    # a decode row of slot 0; two prefill rows of slot 0
    [(1, 150, 150, [150]), (1, 151, 150, [150, 151]), (1, 152, 150, [150, 152]), (1, 153, 150, [150, 151, 153]),
     (1, 154, 150, [150, 152, 154]), (0, 37, 38, []), (0, 38, 39, []), (0, 39, 40, [])], 200, None)
_LONG_ROWS = (
    # Longer contexts (past the AVX2 kernel's 64-key value blocks many times over): a tree of
    # slot 1 after 510 cached tokens; the same keys as its deepest row in one causal row (prefix
    # 513); a decode row of slot 0 at 300 and prefill rows across 256.
    [(1, 510, 510, [510]), (1, 511, 510, [510, 511]), (1, 513, 510, [510, 513]), (1, 512, 510, [510, 511, 512]),
     (1, 600, 513, []), (0, 299, 300, []), (0, 254, 255, []), (0, 255, 256, []), (0, 256, 257, [])], 700, (3, 4))
_RANGE_ROWS = (
    # Key lists of more than one attention range (256 list positions) where a tree's ancestors
    # cross the boundary: a chain of slot 1 after 254 cached tokens (its deepest row sees keys
    # 0..257), the same keys in one causal row, and a decode row of slot 0 at exactly 512 keys.
    [(1, 254, 254, [254]), (1, 255, 254, [254, 255]), (1, 256, 254, [254, 255, 256]),
     (1, 257, 254, [254, 255, 256, 257]), (1, 600, 258, []), (0, 511, 512, [])], 700, (3, 4))


@pytest.mark.parametrize("kv_bf16", [False, True], ids=["fp32-kv", "bf16-kv"])
@pytest.mark.parametrize("case", [_SHORT_ROWS, _LONG_ROWS, _RANGE_ROWS], ids=["short", "long", "ranges"])
def test_attention_rows_together_same_bits_as_alone(h, case, kv_bf16):
    # A tree step's rows attend together (each block of keys read once for the rows and the q heads
    # of a kv head); each row's result must be the same bits as when it comes alone (a plain
    # decode step), or Medusa's greedy output could differ from plain decoding's; nor on the
    # number of threads the work is split over. A bf16 KV cache (the CPU's kv_dtype="bf16") holds
    # the values rounded and widens them exactly: the same bits as an fp32 cache of those values.
    if kv_bf16 and not h.device_name.startswith("cpu"):
        pytest.skip("the bf16 KV cache is the CPU backend's")
    spec, maxseq, same = case
    heads, kvh, hd, slots_n = 6, 2, 80, 2
    width = (heads + 2 * kvh) * hd
    kc = RNG.standard_normal(slots_n * kvh * maxseq * hd).astype(np.float32)
    vc = RNG.standard_normal(kc.size).astype(np.float32)
    slots = [r[0] for r in spec]
    cache_index = [r[1] for r in spec]
    prefix = [r[2] for r in spec]
    ancestors = [r[3] for r in spec]
    extra_offsets = np.cumsum([0] + [len(a) for a in ancestors]).tolist()
    extra = [i for a in ancestors for i in a]
    rows = len(slots)
    qkv = RNG.standard_normal((rows, width)).astype(np.float32)
    if same:  # a tree row and a causal row over the same keys get the same query
        qkv[same[1], : heads * hd] = qkv[same[0], : heads * hd]
    if kv_bf16:  # values a bf16 cache holds exactly
        kc, vc = round_to(kc, "bf16"), round_to(vc, "bf16")
        qkv[:, heads * hd:] = round_to(qkv[:, heads * hd:], "bf16")
    args = (width, heads, kvh, maxseq, hd)
    out, k2, v2 = h.attention(qkv.ravel(), rows, *args, slots, cache_index, prefix, extra_offsets, extra,
                              heads * hd, (heads + kvh) * hd, kc, vc, kv_bf16=kv_bf16)
    out = arr(out, (rows, heads * hd))
    if kv_bf16:
        out32, k32, v32 = h.attention(qkv.ravel(), rows, *args, slots, cache_index, prefix, extra_offsets, extra,
                                      heads * hd, (heads + kvh) * hd, kc, vc)
        assert np.array_equal(arr(out32, (rows, heads * hd)), out)
        assert np.array_equal(arr(k32), arr(k2)) and np.array_equal(arr(v32), arr(v2))
    one_thread = Harness("cpu", 1) if h.device_name.startswith("cpu") else h
    for r in range(rows):
        alone, _, _ = one_thread.attention(qkv[r], 1, *args, [slots[r]], [cache_index[r]], [prefix[r]],
                                           [0, len(ancestors[r])], ancestors[r], heads * hd, (heads + kvh) * hd,
                                           np.array(k2), np.array(v2), kv_bf16=kv_bf16)
        assert np.array_equal(arr(alone), out[r]), r
    if same:
        assert np.array_equal(out[same[0]], out[same[1]])  # a tree row and a causal row over the same keys
    # And against a float64 reference.
    k = arr(k2).reshape(slots_n, kvh, maxseq, hd).astype(np.float64)
    v = arr(v2).reshape(slots_n, kvh, maxseq, hd).astype(np.float64)
    for r in range(rows):
        keys = list(range(prefix[r])) + ancestors[r]
        for hh in range(heads):
            kk, vv = k[slots[r], hh // (heads // kvh), keys], v[slots[r], hh // (heads // kvh), keys]
            s = kk @ qkv[r, hh * hd:(hh + 1) * hd].astype(np.float64) / np.sqrt(hd)
            p = np.exp(s - s.max())
            np.testing.assert_allclose(out[r, hh * hd:(hh + 1) * hd], (p / p.sum()) @ vv, rtol=1e-4, atol=1e-5)


def test_thread_pool_runs_every_task_once():
    """Jobs of 1-64 tasks back to back, on more pool threads than cores (so threads get
    preempted between jobs): every task runs exactly once per job. A thread still looking for work
    in a finished job must not take a task of the next one (it once could, when the next job's task
    count was already set: its last task then ran twice and the job could end while it ran)."""
    import os

    from medusa_rt import _core

    threads = max(4, 2 * (os.cpu_count() or 1))
    assert _core._testing.thread_pool_check(threads, 400_000, 64) == 0

