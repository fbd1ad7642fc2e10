"""`optc.ir.core` helpers: Transpose permutations and Transposes a rewrite may fold into their reader."""

from __future__ import annotations

from optc.ir import parse_text, sole_transpose, transpose_perm

_MODEL = """
<ir_version: 10, opset_import: ["" : 21]>
g (float[2,3] x, float[4,3] t) => (float[2,4] y, float[2,4] z, float[3,4] shown) {
  tt = Transpose <perm = [1, 0]> (t)
  y = MatMul(x, tt)
  td = Transpose (t)
  z = MatMul(x, td)
  twice = Transpose (t)
  a = Neg(twice)
  b = Abs(twice)
  shown = Transpose (t)
}
"""


def _value(model, name):
    return next(o for n in model.graph for o in n.outputs if o.name == name)


def test_transpose_perm_reads_the_attribute_or_reverses_the_axes():
    model = parse_text(_MODEL)
    explicit, implicit = (_value(model, name).producer() for name in ("tt", "td"))
    assert transpose_perm(explicit) == [1, 0]
    assert transpose_perm(implicit, 3) == [2, 1, 0]
    assert transpose_perm(implicit) is None  # the default needs the rank


def test_sole_transpose_takes_only_a_transpose_with_one_reader():
    model = parse_text(_MODEL)
    node, perm = sole_transpose(_value(model, "tt"))
    assert node.op_type == "Transpose" and perm == [1, 0]
    assert sole_transpose(_value(model, "td"))[1] == [1, 0]  # the input's rank gives the default
    assert sole_transpose(_value(model, "twice")) is None  # two readers
    assert sole_transpose(_value(model, "shown")) is None  # a graph output
    assert sole_transpose(_value(model, "y")) is None  # not a Transpose
    assert sole_transpose(None) is None
