"""BF16 emulation: rounding bits against torch, Cast placement, and whole models against torch in bf16."""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from pipeline.quant.bf16 import emulate_bf16, round_to_bf16, to_bf16_model
from pipeline.errors import ModelError

F, I64 = TensorProto.FLOAT, TensorProto.INT64
LEVELS = [ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_ALL]


def torch_bf16(x: np.ndarray) -> np.ndarray:
    return torch.from_numpy(x).to(torch.bfloat16).to(torch.float32).numpy()


def same_bits(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Elementwise: identical float32 bits, or both NaN."""
    return (a.view(np.uint32) == b.view(np.uint32)) | (np.isnan(a) & np.isnan(b))


def make_model(nodes, inputs, outputs, inits=(), opset=17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model, full_check=True)
    return model


def run(model: onnx.ModelProto, feeds: dict, level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL) -> list:
    so = ort.SessionOptions()
    so.graph_optimization_level = level
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def edge_values() -> np.ndarray:
    one_ulp = 2.0**-7  # bf16 keeps 7 mantissa bits
    return np.array([
        0.0, -0.0, 1.0, 1 + one_ulp / 2, 1 + 3 * one_ulp / 2, -(1 + one_ulp / 2),  # ties to even
        1 + one_ulp / 2 + 2**-20,  # just above a tie
        np.finfo(np.float32).max, 3.3895314e38, -3.4e38,  # overflow to inf, largest finite bf16
        1e-40, -1e-40, 1.4e-45, 2**-126, 2**-133 * 3,  # subnormals, smallest normal
        np.inf, -np.inf, np.nan, -np.nan,
    ], dtype=np.float32)


def mlp_torch(seed=0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 16)).eval()


def export(module: torch.nn.Module, example: torch.Tensor) -> onnx.ModelProto:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(module, (example,), buf, dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["y"])
    return onnx.load_from_string(buf.getvalue())


# ---- round_to_bf16 ---------------------------------------------------------------------------------


def test_round_matches_torch_on_random_bit_patterns():
    rng = np.random.default_rng(0)
    x = np.concatenate([
        rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32).view(np.float32),  # every class
        rng.standard_normal(50_000).astype(np.float32) * 1e3,
        # exact ties: low 16 bits 0x8000, with both parities of the kept last bit
        ((rng.integers(0, 2**32, 20_000, dtype=np.uint64).astype(np.uint32) & 0xFFFF0000) | 0x8000).view(np.float32),
    ])
    assert same_bits(round_to_bf16(x), torch_bf16(x)).all()


def test_round_edge_values():
    x = edge_values()
    r = round_to_bf16(x)
    assert same_bits(r, torch_bf16(x)).all()
    assert r[3] == 1.0 and r[4] == 1 + 2**-6 and r[5] == -1.0 and r[6] == 1 + 2**-7
    assert r[7] == np.inf and r[8] == 3.3895314e38 and r[9] == -np.inf
    assert np.signbit(r[1]) and r[12] == 0.0
    assert r[10] != 0 and r[10] == torch_bf16(x[10:11])[0]  # bf16 subnormals are kept, not flushed
    assert np.isnan(r[17]) and np.isnan(r[18])
    assert (r.view(np.uint32) & 0xFFFF).max() == 0  # every result is a bf16 value


def test_round_keeps_shape_and_rejects_other_dtypes():
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4).transpose(2, 0, 1) * 1.001
    assert round_to_bf16(x).shape == (4, 2, 3)
    assert same_bits(round_to_bf16(x), torch_bf16(np.ascontiguousarray(x))).all()
    assert round_to_bf16(np.float32(1.001)).shape == ()
    with pytest.raises(TypeError):
        round_to_bf16(np.ones(3, dtype=np.float64))


@pytest.mark.parametrize("level", LEVELS)
def test_ort_cpu_cast_pair_rounds_like_torch(level):
    """The premise of the emulation: CPU EP Cast float->bf16->float is RNE and is not optimized away."""
    rng = np.random.default_rng(1)
    patterns = rng.integers(0, 2**32, 50_000, dtype=np.uint64).astype(np.uint32)
    x = np.concatenate([edge_values(), patterns.view(np.float32)])
    model = make_model(
        [helper.make_node("Cast", ["x"], ["b"], to=TensorProto.BFLOAT16), helper.make_node("Cast", ["b"], ["y"], to=F)],
        [helper.make_tensor_value_info("x", F, [x.size])], [helper.make_tensor_value_info("y", F, [x.size])],
    )
    (y,) = run(model, {"x": x}, level)
    assert same_bits(y, torch_bf16(x)).all()
    assert same_bits(y, round_to_bf16(x)).all()


# ---- whole models against torch --------------------------------------------------------------------


@pytest.mark.parametrize("level", LEVELS)
def test_mlp_matches_torch_running_in_bf16(level):
    module = mlp_torch()
    x = np.random.default_rng(2).standard_normal((8, 64)).astype(np.float32)
    model = export(module, torch.from_numpy(x))
    (y,) = run(emulate_bf16(model), {"x": x}, level)
    with torch.no_grad():
        ref = module.to(torch.bfloat16)(torch.from_numpy(x).to(torch.bfloat16)).float().numpy()
    # Same rounding points; only fp32 accumulation order inside the Gemms may differ (MLAS vs oneDNN),
    # which can flip a rounding by one bf16 ulp on a few elements.
    ulp = 2.0 ** (np.floor(np.log2(np.abs(ref) + 1e-30)) - 7)
    assert (np.abs(y - ref) <= ulp).all()
    assert same_bits(y, ref).mean() > 0.95


def test_rounding_points_match_torch_exactly_with_order_independent_sums():
    """MatMul, Add, Relu, MatMul as separate ops; dyadic data with few bits makes every fp32 sum exact
    in any order, so any difference would be a misplaced or missing rounding, not accumulation order."""
    rng = np.random.default_rng(3)
    x = rng.integers(-15, 16, (4, 16)).astype(np.float32) / 16
    w1 = rng.integers(-15, 16, (16, 32)).astype(np.float32) / 16
    b1 = rng.integers(-255, 256, 32).astype(np.float32) / 64  # 9 significant bits: rounded offline
    w2 = rng.integers(-15, 16, (32, 8)).astype(np.float32) / 16
    model = make_model(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h0"], name="mm1"),
            helper.make_node("Add", ["h0", "b1"], ["h1"], name="add"),
            helper.make_node("Relu", ["h1"], ["h2"], name="relu"),
            helper.make_node("MatMul", ["h2", "w2"], ["y"], name="mm2"),
        ],
        [helper.make_tensor_value_info("x", F, [4, 16])], [helper.make_tensor_value_info("y", F, [4, 8])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(b1, "b1"), numpy_helper.from_array(w2, "w2")],
    )
    (y,) = run(emulate_bf16(model), {"x": x})

    r = lambda t: t.to(torch.bfloat16).to(torch.float32)  # noqa: E731
    t = lambda a: r(torch.from_numpy(a))  # noqa: E731
    ref = r(r(torch.relu(r(r(t(x) @ t(w1)) + t(b1)))) @ t(w2)).numpy()
    assert same_bits(y, ref).all()
    (y_fp32,) = run(model, {"x": x})
    assert not np.array_equal(y, y_fp32)  # the data does exercise the rounding


def test_error_against_float32_has_bf16_magnitude():
    module = mlp_torch(seed=4)
    x = np.random.default_rng(4).standard_normal((32, 64)).astype(np.float32)
    model = export(module, torch.from_numpy(x))
    (y32,) = run(model, {"x": x})
    (y16,) = run(emulate_bf16(model), {"x": x})
    rel = np.abs(y16 - y32) / np.abs(y32).max()
    assert 1e-4 < rel.max() < 2e-2
    assert 2e-4 < np.median(np.abs(y16 - y32) / np.abs(y32)) < 2e-2


# ---- graph surgery -----------------------------------------------------------------------------------


def reshape_model() -> onnx.ModelProto:
    """Float path with an int64 shape path beside it: Shape -> Gather -> Concat -> Reshape."""
    w = np.random.default_rng(5).standard_normal((6, 6)).astype(np.float32)
    return make_model(
        [
            helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
            helper.make_node("Shape", ["h"], ["s"], name="shape"),
            helper.make_node("Gather", ["s", "zero"], ["n"], name="gather", axis=0),
            helper.make_node("Concat", ["n", "minus1"], ["new_shape"], name="concat", axis=0),
            helper.make_node("Reshape", ["h", "new_shape"], ["r"], name="reshape"),
            helper.make_node("Transpose", ["r"], ["t"], name="transpose", perm=[1, 0]),
            helper.make_node("Sigmoid", ["t"], ["y"], name="sigmoid"),
        ],
        [helper.make_tensor_value_info("x", F, [2, 3, 6])],
        [helper.make_tensor_value_info("y", F, [18, 2]), helper.make_tensor_value_info("new_shape", I64, [2])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array([0], np.int64), "zero"),
         numpy_helper.from_array(np.array([-1], np.int64), "minus1")],
    )


def test_interface_kept_and_int_tensors_untouched():
    model = reshape_model()
    emulated = emulate_bf16(model)
    onnx.checker.check_model(emulated, full_check=True)
    assert list(emulated.graph.input) == list(model.graph.input)
    assert list(emulated.graph.output) == list(model.graph.output)
    inits = {t.name: t for t in emulated.graph.initializer}
    for name in ("zero", "minus1"):
        assert inits[name] == next(t for t in model.graph.initializer if t.name == name)
    types = {v.name: v.type.tensor_type.elem_type for v in onnx.shape_inference.infer_shapes(emulated).graph.value_info}
    types.update({v.name: v.type.tensor_type.elem_type for v in [*emulated.graph.input, *emulated.graph.output]})
    casts = [n for n in emulated.graph.node if n.op_type == "Cast"]
    assert casts and all(types[n.input[0]] in (F, TensorProto.BFLOAT16) for n in casts)
    # Shape/Gather/Concat keep their int inputs; Reshape and Transpose move bf16 values: no pair after them
    by_name = {n.name: n for n in emulated.graph.node}
    assert list(by_name["gather"].input) == ["s", "zero"] and list(by_name["concat"].input) == ["n", "minus1"]
    assert list(by_name["reshape"].output) == ["r"] and list(by_name["transpose"].output) == ["t"]

    x = np.random.default_rng(6).standard_normal((2, 3, 6)).astype(np.float32)
    (y, shape), (y32, shape32) = run(emulated, {"x": x}), run(model, {"x": x})
    assert y.shape == y32.shape and np.array_equal(shape, shape32)
    assert same_bits(y, round_to_bf16(y)).all() and not np.array_equal(y, y32)


@pytest.mark.parametrize("case", ["reshape", "keep_float"])
def test_every_value_an_npu_node_reads_or_writes_is_bf16(case):
    """Dump every float tensor an NPU node reads, and every one it writes (under the input model's
    name, which the Cast pair takes over; exact ops keep theirs), and check each is bf16."""
    model, keep = (reshape_model(), set()) if case == "reshape" else (keep_float_model(), {"softmax"})
    emulated = emulate_bf16(model, keep_float=keep)
    npu_written = {t for n in model.graph.node if n.name not in keep for t in n.output}  # names in the input model
    inferred = onnx.shape_inference.infer_shapes(emulated)
    infos = [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]
    float_names = {v.name for v in infos if v.type.tensor_type.elem_type == F}
    float_names |= {t.name for t in emulated.graph.initializer if t.data_type == F}
    npu_nodes = [n for n in emulated.graph.node if n.name not in keep and "__" not in n.name]
    watched = {t for n in npu_nodes for t in n.input if t in float_names}
    watched |= npu_written & float_names
    inits = {t.name: numpy_helper.to_array(t) for t in emulated.graph.initializer}
    probe = onnx.ModelProto()
    probe.CopyFrom(emulated)
    present = {o.name for o in probe.graph.output}
    probe.graph.output.extend(helper.make_tensor_value_info(t, F, None) for t in sorted(watched - present - set(inits)))
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    x = np.random.default_rng(7).standard_normal(shape).astype(np.float32)
    values = dict(zip([o.name for o in probe.graph.output], run(probe, {"x": x})))
    values.update(inits)
    assert len(watched) >= 5
    for name in sorted(watched):
        assert same_bits(values[name], round_to_bf16(values[name])).all(), name


def keep_float_model() -> onnx.ModelProto:
    """mm (NPU) -> softmax (CPU) -> cpu_add of w -> mul by w (NPU; w shared with the CPU add).
    Outputs p, q (written on the CPU; q also read by the NPU) and y."""
    rng = np.random.default_rng(8)
    w = rng.standard_normal((8, 8)).astype(np.float32)
    return make_model(
        [
            helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
            helper.make_node("Softmax", ["h"], ["p"], name="softmax", axis=-1),
            helper.make_node("Add", ["p", "w"], ["q"], name="cpu_add"),
            helper.make_node("Mul", ["q", "w"], ["y"], name="mul"),
        ],
        [helper.make_tensor_value_info("x", F, [8, 8])],
        [helper.make_tensor_value_info(name, F, [8, 8]) for name in ("p", "q", "y")],
        [numpy_helper.from_array(w, "w")],
    )


def test_keep_float_nodes_run_unrounded():
    model = keep_float_model()
    emulated = emulate_bf16(model, keep_float=["softmax", "cpu_add"])
    x = np.random.default_rng(9).standard_normal((8, 8)).astype(np.float32)
    p, q, y = run(emulated, {"x": x})
    w = numpy_helper.to_array(model.graph.initializer[0]).copy()
    r = lambda t: t.to(torch.bfloat16).to(torch.float32)  # noqa: E731
    h = r(torch.from_numpy(round_to_bf16(x)) @ torch.from_numpy(round_to_bf16(w)))  # on the NPU
    p_ref = torch.softmax(h, dim=-1)  # CPU, float32, reads the bf16 h
    assert np.allclose(p, p_ref.numpy(), rtol=1e-6, atol=1e-7)
    assert not same_bits(p, round_to_bf16(p)).all()  # softmax output was not rounded
    q_ref = torch.from_numpy(p) + torch.from_numpy(w)  # CPU reads the float32 weight
    assert same_bits(q, q_ref.numpy()).all()  # elementwise float32: same bits, and not rounded
    y_ref = r(r(q_ref) * r(torch.from_numpy(w)))  # NPU rounds what it reads from the CPU
    assert same_bits(y, y_ref.numpy()).all()
    assert same_bits(y, round_to_bf16(y)).all()
    names = {t.name for t in emulated.graph.initializer}
    assert "w" in names and len(names) == 2  # float32 original for the CPU, a rounded copy for the NPU
    assert np.array_equal(numpy_helper.to_array(next(t for t in emulated.graph.initializer if t.name == "w")), w)


def test_input_model_not_mutated():
    model = keep_float_model()
    before = model.SerializeToString()
    emulate_bf16(model, keep_float=["softmax"])
    to_bf16_model(model, keep_float=["softmax"])
    assert model.SerializeToString() == before


def test_bf16_storage_model_has_same_outputs_and_half_the_weights():
    module = mlp_torch(seed=10)
    x = np.random.default_rng(10).standard_normal((8, 64)).astype(np.float32)
    model = export(module, torch.from_numpy(x))
    stored = to_bf16_model(model)
    onnx.checker.check_model(stored, full_check=True)
    assert all(t.data_type == TensorProto.BFLOAT16 for t in stored.graph.initializer)
    assert stored.ByteSize() < 0.55 * model.ByteSize()
    assert [o.name for o in stored.graph.output] == ["y"]
    assert same_bits(run(stored, {"x": x})[0], run(emulate_bf16(model), {"x": x})[0]).all()


def test_refusals():
    model = keep_float_model()
    with pytest.raises(ModelError, match="not_a_node"):
        emulate_bf16(model, keep_float=["softmax", "not_a_node"])
    with pytest.raises(ModelError, match="''"):
        emulate_bf16(model, keep_float=[""])  # would otherwise keep every unnamed node
    old = helper.make_model(model.graph, opset_imports=[helper.make_opsetid("", 11)])
    with pytest.raises(ModelError, match="opset"):
        emulate_bf16(old)
