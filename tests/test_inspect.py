"""NPU readiness rules and placement prediction, on tiny ONNX graphs built in code."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from pipeline.errors import ModelError, ReadinessError
from pipeline.inspect import Finding, inspect_model, write_json
from pipeline.core.formats import Format
from pipeline.targets import TargetError, get_target

F = TensorProto.FLOAT
RNG = np.random.default_rng(0)


def _model(nodes, inputs, outputs, inits=(), opset=17, ir=None) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    if ir is not None:
        model.ir_version = ir
    return model


def _weights(name, shape, dtype=np.float32):
    return numpy_helper.from_array(RNG.standard_normal(shape).astype(dtype), name)


def float_cnn(batch=1, opset=17) -> onnx.ModelProto:
    """x[batch,3,8,8] -> Conv 3->4 (3x3, pad 1) -> Relu -> Conv 4->2 (3x3, pad 1) -> y[batch,2,8,8]."""
    nodes = [
        helper.make_node("Conv", ["x", "W1", "B1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "W2"], ["y"], name="conv2", pads=[1, 1, 1, 1]),
    ]
    inits = [_weights("W1", (4, 3, 3, 3)), _weights("B1", (4,)), _weights("W2", (2, 4, 3, 3))]
    return _model(nodes, [helper.make_tensor_value_info("x", F, [batch, 3, 8, 8])],
                  [helper.make_tensor_value_info("y", F, [batch, 2, 8, 8])], inits, opset=opset)


# conv1: 1*4*8*8 outputs x (3*3*3) MACs; conv2: 1*2*8*8 outputs x (4*3*3) MACs.
CONV1_MACS = 256 * 27
CONV2_MACS = 128 * 36


class QDQ:
    """Builds a QDQ graph step by step: activations go through Q -> DQ pairs, weights through DQ."""

    def __init__(self, act=TensorProto.INT8, zp=0, scale=0.5):
        self.act, self.zp, self.scale = act, zp, scale
        self.nodes, self.inits = [], []

    def const(self, name, value, dtype):
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def qdq(self, tensor, scale=None, tag=None):
        """Q then DQ of an activation; the Q node is named q_<tag>."""
        tag = tag or tensor
        np_type = helper.tensor_dtype_to_np_dtype(self.act)
        s = self.const(f"{tag}_s", scale if scale is not None else self.scale, np.float32)
        z = self.const(f"{tag}_zp", self.zp, np_type)
        self.nodes.append(helper.make_node("QuantizeLinear", [tensor, s, z], [f"{tag}_q"], name=f"q_{tag}"))
        self.nodes.append(helper.make_node("DequantizeLinear", [f"{tag}_q", s, z], [f"{tag}_dq"], name=f"dq_{tag}"))
        return f"{tag}_dq"

    def weight(self, name, shape, dtype=np.int8, scale=0.25):
        self.const(f"{name}_int", RNG.integers(-3, 4, shape), dtype)
        s, z = self.const(f"{name}_s", scale, np.float32), self.const(f"{name}_zp", 0, dtype)
        self.nodes.append(helper.make_node("DequantizeLinear", [f"{name}_int", s, z], [name], name=f"dq_{name}"))
        return name

    def conv(self, x, name, w_shape, bias_dtype=np.int32):
        w = self.weight(f"{name}_w", w_shape)
        b = self.weight(f"{name}_b", (w_shape[0],), dtype=bias_dtype, scale=0.125)
        self.nodes.append(helper.make_node("Conv", [x, w, b], [name], name=name, pads=[1, 1, 1, 1]))
        return name

    def model(self, output, out_shape, in_shape=(1, 3, 8, 8), opset=17):
        return _model(self.nodes, [helper.make_tensor_value_info("x", F, list(in_shape))],
                      [helper.make_tensor_value_info(output, F, list(out_shape))], self.inits, opset=opset)


def qdq_cnn(act=TensorProto.INT8, zp=0, scale=0.5, in_scale=None, bias_dtype=np.int32) -> onnx.ModelProto:
    """Q/DQ -> conv1 -> Q/DQ -> conv2 -> Q/DQ -> y, every Conv wrapped."""
    b = QDQ(act, zp, scale)
    h = b.qdq("x", scale=in_scale, tag="in")
    h = b.qdq(b.conv(h, "conv1", (4, 3, 3, 3), bias_dtype=bias_dtype))
    h = b.qdq(b.conv(h, "conv2", (2, 4, 3, 3)))
    b.nodes.append(helper.make_node("Identity", [h], ["y"], name="out"))
    return b.model("y", (1, 2, 8, 8))


def rules(inspection, kind="violations"):
    return [(f.rule, f.where) for f in getattr(inspection, kind)]


# --- hard rules ---------------------------------------------------------------------------------


def test_clean_float_cnn_is_ready_and_predicted_on_the_npu():
    result = inspect_model(float_cnn(), "xdna2")
    assert result.ok and result.violations == []
    assert result.format is Format.A8W8 and result.detected_format is None and not result.quantized
    assert [p.device for p in result.placement] == ["NPU", "NPU", "NPU"]
    assert result.npu_node_share == 1.0 and result.transitions == 0


def test_dynamic_batch_is_a_violation_naming_the_input_and_dim():
    model = float_cnn()
    dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    dim.dim_param = "N"
    model.graph.output[0].type.tensor_type.shape.dim[0].dim_param = "N"
    result = inspect_model(model, "xdna2")
    assert rules(result) == [("static-shape", "x")]  # the output's dynamic dim is the same fault
    assert "dim 0 ('N')" in result.violations[0].message
    with pytest.raises(ReadinessError, match=r"\[static-shape\] x: input 'x' dim 0"):
        result.raise_for_violations()
    assert inspect_model(model, "cpu").ok  # the CPU takes dynamic shapes


def test_loop_is_a_violation():
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]), helper.make_node("Identity", ["v_in"], ["v_out"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_in", F, [1, 4])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_out", F, [1, 4])],
    )
    inits = [numpy_helper.from_array(np.array(3, np.int64), "trip"), numpy_helper.from_array(np.array(True), "cond")]
    loop = helper.make_node("Loop", ["trip", "cond", "x"], ["y"], name="the_loop", body=body)
    model = _model([loop], [helper.make_tensor_value_info("x", F, [1, 4])],
                   [helper.make_tensor_value_info("y", F, [1, 4])], inits)
    result = inspect_model(model, "xdna1")
    assert ("forbidden-op", "the_loop") in rules(result)
    assert "Loop" in result.violations[0].message


def test_opset_11_is_a_violation_for_a_target_needing_13():
    result = inspect_model(float_cnn(opset=11), "xdna2")
    assert rules(result) == [("opset", "opset_import")]
    assert "opset 11" in result.violations[0].message and "13..21" in result.violations[0].message
    assert ("opset", "opset_import") in rules(inspect_model(float_cnn(opset=18), "xdna2"), "warnings")


def test_batch_above_one_on_a_cnn_is_a_violation():
    result = inspect_model(float_cnn(batch=4), "xdna1")
    assert ("batch-one", "x") in rules(result)
    matmul = _model([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")],
                    [helper.make_tensor_value_info("x", F, [4, 8])], [helper.make_tensor_value_info("y", F, [4, 2])],
                    [_weights("W", (8, 2))])
    result = inspect_model(matmul, "xdna2")
    assert result.ok and ("batch-one", "x") in rules(result, "warnings")  # not a CNN: soft


def test_non_pow2_scale_under_xint8_names_the_q_node():
    model = qdq_cnn(in_scale=0.3)
    assert inspect_model(model, "xdna2", Format.A8W8).ok
    result = inspect_model(model, "xdna2", Format.XINT8)
    assert rules(result) == [("pow2-scale", "q_in"), ("pow2-scale", "dq_in")]
    assert "0.3" in result.violations[0].message and "0.25" in result.violations[0].message  # nearest pow2
    assert ("format-mismatch", "<model>") in rules(result, "warnings")
    with pytest.raises(ReadinessError, match=r"\[pow2-scale\] q_in: .*and 1 more violation"):
        result.raise_for_violations()


def test_int8_bias_is_a_violation():
    result = inspect_model(qdq_cnn(bias_dtype=np.int8), "xdna2")
    assert rules(result) == [("bias-int32", "dq_conv1_b")]
    assert "int8" in result.violations[0].message


def test_float_bias_on_a_quantized_conv_is_a_violation():
    model = qdq_cnn()
    conv1 = next(n for n in model.graph.node if n.name == "conv1")
    conv1.input[2] = "B_float"
    model.graph.initializer.append(_weights("B_float", (4,)))
    assert rules(inspect_model(model, "xdna2")) == [("bias-int32", "conv1")]


def test_asymmetric_zero_point_is_a_violation_under_a_symmetric_format():
    result = inspect_model(qdq_cnn(act=TensorProto.INT8, zp=3, scale=0.3), "xdna2")
    assert result.detected_format is Format.A8W8
    assert {rule for rule, _ in rules(result)} == {"zero-point"}
    assert ("zero-point", "q_in") in rules(result)


def test_unsupported_format_is_a_violation_and_a_bad_asked_format_an_error():
    u8s8 = qdq_cnn(act=TensorProto.UINT8, zp=10, scale=0.3)
    result = inspect_model(u8s8, "xdna2")
    assert result.detected_format is Format.U8S8 and rules(result) == [("format", "<model>")]
    assert all(p.device == "CPU" for p in result.placement)
    assert inspect_model(u8s8, "cpu").ok
    with pytest.raises(TargetError, match="xint8"):
        inspect_model(u8s8, "xdna1", "a8w8")


# --- format detection ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("act", "zp", "scale", "target", "expected"),
    [
        (TensorProto.INT8, 0, 0.5, "xdna2", Format.XINT8),  # pow2 int8
        (TensorProto.INT8, 0, 0.3, "xdna2", Format.A8W8),
        (TensorProto.INT8, 0, 0.5, "cpu", Format.A8W8),  # the cpu target has no xint8
        (TensorProto.UINT8, 128, 0.5, "xdna1", Format.XINT8),  # Quark's legacy uint8 XINT8
        (TensorProto.UINT8, 7, 0.3, "cpu", Format.U8S8),
        (TensorProto.INT16, 0, 0.3, "xdna2", Format.A16W8),
    ],
)
def test_format_detection(act, zp, scale, target, expected):
    result = inspect_model(qdq_cnn(act=act, zp=zp, scale=scale), target)
    assert result.quantized and result.detected_format is expected and result.format is expected
    assert result.ok, result.violations


def test_bf16_casts_are_detected_and_go_with_their_compute():
    nodes = [
        helper.make_node("Cast", ["x"], ["xb"], name="to_bf16", to=TensorProto.BFLOAT16),
        helper.make_node("Cast", ["xb"], ["xf"], name="to_f32", to=F),
        helper.make_node("Einsum", ["xf", "W"], ["y"], name="einsum", equation="ij,jk->ik"),
    ]
    model = _model(nodes, [helper.make_tensor_value_info("x", F, [1, 8])],
                   [helper.make_tensor_value_info("y", F, [1, 2])], [_weights("W", (8, 2))])
    result = inspect_model(model, "xdna2")
    assert result.detected_format is Format.BF16 and not result.quantized
    assert [(p.node, p.device) for p in result.placement] == [("einsum", "NPU")]  # Einsum is in the bf16 table
    assert sorted(p.node for p in result.attached) == ["to_bf16", "to_f32"]


def test_com_microsoft_16_bit_qdq_is_a16w8_with_known_shapes():
    """onnxruntime writes 16-bit Q/DQ in the com.microsoft domain, which onnx shape inference skips."""
    model = qdq_cnn(act=TensorProto.INT16, scale=0.3)
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            node.domain = "com.microsoft"
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    result = inspect_model(model, "xdna2")
    assert result.detected_format is Format.A16W8 and result.ok, result.violations
    assert result.total_macs == CONV1_MACS + CONV2_MACS and result.npu_macs == result.total_macs


# --- placement, MACs, transitions ---------------------------------------------------------------


def qdq_conv_einsum_conv() -> onnx.ModelProto:
    """conv1 -> Einsum (not in the a8w8 table) -> conv2, everything wrapped in Q/DQ."""
    b = QDQ(scale=0.3)
    h = b.qdq(b.conv(b.qdq("x", tag="in"), "conv1", (4, 3, 3, 3)))
    b.nodes.append(helper.make_node("Einsum", [h], ["e"], name="einsum", equation="nchw->nchw"))
    h = b.qdq(b.conv(b.qdq("e"), "conv2", (2, 4, 3, 3)))
    b.nodes.append(helper.make_node("Identity", [h], ["y"], name="out"))
    return b.model("y", (1, 2, 8, 8))


def test_op_outside_the_table_falls_back_to_cpu_with_two_transitions():
    result = inspect_model(qdq_conv_einsum_conv(), "xdna2")
    assert result.ok and result.format is Format.A8W8
    devices = {p.node: p.device for p in result.placement}
    assert devices == {"conv1": "NPU", "einsum": "CPU", "conv2": "NPU", "out": "CPU"}
    einsum = next(p for p in result.placement if p.node == "einsum")
    assert "Einsum is not in xdna2's a8w8 operator table" in einsum.reason
    # NPU conv1 -> CPU einsum -> NPU conv2, plus the float Identity on the graph output after conv2's Q/DQ.
    assert result.transitions == 3
    assert result.npu_mac_share == 1.0 and result.npu_node_share == 0.5
    # Q/DQ nodes are not counted; they go with the compute they wrap.
    attached = {p.node: p.device for p in result.attached}
    assert attached["q_conv1"] == "NPU" and attached["dq_e"] == "NPU" and attached["q_e"] == "CPU"
    assert ("cpu-fallback", "einsum") in rules(result, "warnings")


def test_transitions_npu_cpu_npu_is_two():
    model = qdq_conv_einsum_conv()
    model.graph.node.remove(next(n for n in model.graph.node if n.name == "out"))
    model.graph.output[0].name = "conv2_dq"
    result = inspect_model(model, "xdna2")
    assert [p.device for p in result.placement] == ["NPU", "CPU", "NPU"]
    assert result.transitions == 2


def test_mac_share_of_a_two_layer_model_with_one_float_layer():
    b = QDQ(scale=0.3)
    h = b.qdq(b.conv(b.qdq("x", tag="in"), "conv1", (4, 3, 3, 3)))
    b.inits.append(_weights("W2", (2, 4, 3, 3)))  # float weight: conv2 stays float, on the CPU
    b.nodes.append(helper.make_node("Conv", [h, "W2"], ["y"], name="conv2", pads=[1, 1, 1, 1]))
    result = inspect_model(b.model("y", (1, 2, 8, 8)), "xdna2")
    macs = {p.node: p.macs for p in result.placement}
    assert macs == {"conv1": CONV1_MACS, "conv2": CONV2_MACS}
    assert result.total_macs == 6912 + 4608 and result.npu_macs == 6912
    assert result.npu_mac_share == pytest.approx(6912 / 11520)
    conv2 = next(p for p in result.placement if p.node == "conv2")
    assert conv2.device == "CPU" and "weight 'W2' is float" in conv2.reason
    assert result.transitions == 1


def test_macs_of_matmul_gemm_and_conv_transpose():
    nodes = [
        helper.make_node("MatMul", ["a", "Wm"], ["m"], name="matmul"),  # [1,4,8] x [8,16]
        helper.make_node("Gemm", ["g", "Wg"], ["gy"], name="gemm", transB=1),  # [2,8] x [3,8]^T
        helper.make_node("ConvTranspose", ["t", "Wt"], ["ty"], name="deconv"),  # [1,2,4,4], W [2,3,3,3]
    ]
    model = _model(
        nodes,
        [helper.make_tensor_value_info("a", F, [1, 4, 8]), helper.make_tensor_value_info("g", F, [2, 8]),
         helper.make_tensor_value_info("t", F, [1, 2, 4, 4])],
        [helper.make_tensor_value_info(n, F, None) for n in ("m", "gy", "ty")],
        [_weights("Wm", (8, 16)), _weights("Wg", (3, 8)), _weights("Wt", (2, 3, 3, 3))],
    )
    result = inspect_model(model, "cpu")
    assert {p.node: p.macs for p in result.placement} == {"matmul": 4 * 16 * 8, "gemm": 2 * 3 * 8,
                                                          "deconv": 32 * 27}
    assert result.npu_macs == 0 and result.npu_mac_share == 0.0  # the cpu target runs it all on the CPU


def test_missing_shapes_are_tolerated():
    model = _model([helper.make_node("MatMul", ["x", "y"], ["z"], name="mm")],
                   [helper.make_tensor_value_info("x", F, None), helper.make_tensor_value_info("y", F, None)],
                   [helper.make_tensor_value_info("z", F, None)])
    result = inspect_model(model, "cpu")
    assert result.placement[0].macs is None and result.total_macs == 0 and result.npu_mac_share is None
    assert ("macs-unknown", "mm") in rules(result, "warnings")


def test_xdna1_runs_a_model_with_one_conv_on_the_cpu():
    b = QDQ(scale=0.5)
    h = b.qdq(b.conv(b.qdq("x", tag="in"), "conv1", (4, 3, 3, 3)))
    result = inspect_model(b.model(h, (1, 4, 8, 8)), "xdna1")
    assert result.ok and [p.device for p in result.placement] == ["CPU"]
    assert ("min-conv", "<model>") in rules(result, "warnings")
    assert inspect_model(qdq_cnn(), "xdna1").npu_node_share == pytest.approx(2 / 3)  # the float Identity


def test_activation_between_a_conv_and_its_q_is_fused():
    b = QDQ(scale=0.3)
    b.conv(b.qdq("x", tag="in"), "conv1", (4, 3, 3, 3))
    b.nodes.append(helper.make_node("Relu", ["conv1"], ["r"], name="relu"))
    h = b.qdq(b.conv(b.qdq("r"), "conv2", (2, 4, 3, 3)))
    result = inspect_model(b.model(h, (1, 2, 8, 8)), "xdna2")
    assert {p.node: p.device for p in result.placement} == {"conv1": "NPU", "relu": "NPU", "conv2": "NPU"}
    assert result.transitions == 0 and result.npu_node_share == 1.0


def test_data_movement_between_npu_nodes_stays_on_the_npu():
    b = QDQ(scale=0.3)
    h = b.qdq(b.conv(b.qdq("x", tag="in"), "conv1", (4, 3, 3, 3)))
    b.nodes.append(helper.make_node("Transpose", [h], ["t"], name="transpose", perm=[0, 1, 3, 2]))
    h = b.qdq(b.conv("t", "conv2", (2, 4, 3, 3)))
    b.nodes.append(helper.make_node("Reshape", [h, b.const("shape", [1, 128], np.int64)], ["y"], name="reshape"))
    result = inspect_model(b.model("y", (1, 128)), "xdna2")
    devices = {p.node: p.device for p in result.placement}
    # transpose sits between two NPU convs; the reshape writes the float graph output.
    assert devices == {"conv1": "NPU", "transpose": "NPU", "conv2": "NPU", "reshape": "CPU"}
    assert result.transitions == 1


# --- reports ------------------------------------------------------------------------------------


def test_json_is_deterministic_and_written_atomically(tmp_path):
    model = qdq_conv_einsum_conv()
    first, second = inspect_model(model, "xdna2").to_json(), inspect_model(model, "xdna2").to_json()
    assert json.dumps(first, sort_keys=True) == json.dumps(second, sort_keys=True)
    assert first["summary"]["nodes_cpu"] == 2 and first["summary"]["transitions"] == 3
    assert first["format"] == "a8w8" and first["target"] == "xdna2"
    path = tmp_path / "out" / "placement.json"
    write_json(inspect_model(model, "xdna2"), path)
    text = path.read_text()
    assert json.loads(text) == first and text.endswith("\n")
    assert list(json.loads(text)) == sorted(json.loads(text))  # keys sorted
    write_json(inspect_model(model, "xdna2"), path)
    assert path.read_text() == text and [p.name for p in path.parent.iterdir()] == ["placement.json"]


def test_table_lists_cpu_fallback_not_npu_nodes():
    text = inspect_model(qdq_conv_einsum_conv(), "xdna2").table()
    assert "2 on NPU, 2 on CPU" in text and "transitions  3" in text
    assert "CPU fallback (2 nodes)" in text and "einsum" in text and "Einsum is not in" in text
    assert "conv1" not in text.split("CPU fallback")[1]


def test_inspect_a_file_and_an_unreadable_file(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(float_cnn(), str(path))
    result = inspect_model(path, get_target("xdna1"))
    assert result.model == str(path) and result.ok
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(ModelError, match="bad.onnx"):
        inspect_model(bad, "xdna1")


def test_findings_are_tuples_of_rule_where_message():
    finding = inspect_model(float_cnn(opset=11), "xdna2").violations[0]
    assert isinstance(finding, Finding) and isinstance(finding, tuple)
    rule, where, message = finding
    assert (rule, where) == ("opset", "opset_import") and "\n" not in message


def test_sixteen_bit_values_in_an_a8w8_model_are_mixed_precision_not_a_violation():
    """The accuracy-aware fallback promotes values of an A8W8 model to int16 (A16W8 on the same chip)."""
    import torch

    from pipeline.quant.qdq import quantize_qdq
    from pipeline.quant.statistics import collect_histograms as collect_statistics
    from pipeline.targets import get_target

    import io

    module = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 2, 3)).eval()
    buffer = io.BytesIO()
    torch.onnx.export(module, (torch.randn(1, 1, 8, 8),), buffer, input_names=["x"], opset_version=17, dynamo=False)
    model = onnx.shape_inference.infer_shapes(onnx.load_from_string(buffer.getvalue()))
    rng = np.random.default_rng(0)
    stats = collect_statistics(model, [{"x": rng.standard_normal((1, 1, 8, 8)).astype(np.float32)}], progress=False)
    promoted = [n.output[0] for n in model.graph.node if n.op_type == "Relu"]
    quantized, _, _ = quantize_qdq(model, stats, target=get_target("xdna2"), fmt=Format.A8W8,
                                   method="minmax", promote={promoted[0]: 16})
    xdna2 = inspect_model(quantized, "xdna2", "a8w8")
    assert xdna2.ok, xdna2.violations
    assert any(w.rule == "mixed-precision" for w in xdna2.warnings)
    xdna1 = inspect_model(quantized, "xdna1", "xint8")  # xdna1 has no 16-bit format: a real violation
    assert not xdna1.ok
