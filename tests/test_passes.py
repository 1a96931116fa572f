"""Graph rewrites of the conversion copy: the pass contract and the check after a chain."""

from __future__ import annotations

import copy

import onnx
import pytest
from onnx import TensorProto, helper

from anp_onnx.errors import ConversionError
from anp_onnx.passes import (
    drop_inert_allowzero, explicit_auto_pad, output_activation, precompute_constants, run_passes,
    strip_output_softmax, unique_node_names,
)


def _softmax_model() -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("Softmax", ["r"], ["y"], name="sm", axis=1)]
    return helper.make_model(helper.make_graph(nodes, "g", [x], [y]), opset_imports=[helper.make_opsetid("", 13)])


def test_passes_leave_an_untouched_model_as_the_same_object():
    model = _softmax_model()
    for rewrite in (explicit_auto_pad, precompute_constants, drop_inert_allowzero):
        out, modified = rewrite(model)
        assert out is model and not modified


def test_final_softmax_is_reported_and_stripped_from_a_copy():
    model = _softmax_model()
    before = model.SerializeToString()
    assert output_activation(model) == "Softmax"
    out, changed = run_passes(model, [strip_output_softmax, unique_node_names])
    assert changed == ["strip_output_softmax", "unique_node_names"]
    assert [n.op_type for n in out.graph.node] == ["Relu"] and out.graph.output[0].name == "r"
    assert out.graph.node[0].name == "relu__0"
    assert output_activation(out) is None and strip_output_softmax(out) == (out, False)
    assert model.SerializeToString() == before  # the input is never changed


def test_a_chain_that_loses_a_value_is_refused():
    def drop_first_node(model):
        out = copy.deepcopy(model)
        del out.graph.node[0]
        return out, True

    with pytest.raises(ConversionError, match=r"drop_first_node.*nothing computes: r"):
        run_passes(_softmax_model(), [drop_first_node])
    broken = _softmax_model()
    del broken.graph.node[0]  # already broken: left for the converter to report
    assert run_passes(broken, [unique_node_names])[1] == ["unique_node_names"]


def test_explicit_padding_touches_only_conv_and_pools():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    w = helper.make_tensor("w", TensorProto.FLOAT, [2, 2, 3, 3], [0.1] * 36)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", auto_pad="SAME_UPPER", strides=[2, 2]),
             helper.make_node("ConvTranspose", ["c", "w"], ["y"], name="up", auto_pad="SAME_UPPER", strides=[2, 2])]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], [w]), opset_imports=[helper.make_opsetid("", 13)])
    out, modified = explicit_auto_pad(model)
    assert modified
    conv, up = out.graph.node
    assert {a.name: helper.get_attribute_value(a) for a in conv.attribute}["pads"] == [0, 0, 1, 1]
    assert "pads" not in {a.name for a in up.attribute}
    assert helper.get_attribute_value(next(a for a in up.attribute if a.name == "auto_pad")) == b"SAME_UPPER"
