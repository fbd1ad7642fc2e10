"""`rotate`: computational-invariance rotations of a decoder's residual stream (QuaRot, SpinQuant).

An orthogonal Q (a randomized Hadamard matrix by default) rotates the residual
stream h ↦ hQ. The model computes the same function, but the weights and the
activations the quantizers see have their outliers spread over every channel
(incoherence processing: Chee et al., QuIP, 2023; Tseng et al., QuIP#, 2024;
Ashkboos et al., QuaRot, 2024; Liu et al., SpinQuant, 2024; the invariance
itself is Ashkboos et al., SliceGPT, 2024):

* each RMSNorm's scale g is folded into the linear layers that read the norm
  (W ← diag(g)·W) and set to ones; an RMSNorm without scale commutes with Q
  (‖hQ‖ = ‖h‖), so its output is the old one rotated;
* the embedding table T becomes T·Q; every linear layer that reads a norm of
  the stream gets W ← Qᵀ·W, every linear layer that writes the stream (the
  output and down projections, through the residual Add) W ← W·Q;
* a tied lm_head reads Tᵀ: with `untie=true` (the default) it gets its own
  initializer Qᵀ·diag(g)·Tᵀ; with `untie=false` the file keeps one table and a
  small [H, H] MatMul by Qᵀ·diag(g)·Q goes in front of the head;
* `heads=true`: per attention head, the value projection's output columns are
  rotated by a Hadamard R of the head size and the output projection's input
  rows by Rᵀ (rotations commute with the attention-weighted sum over tokens);
* `online=true`: a Hadamard R of the FFN width goes in front of each down
  projection, R·W_down in its weight; R = A ⊗ B runs as two small MatMuls on
  the activation reshaped to [..., a, b] (Aᵀ·X·B), not an [I, I] constant.

Structure is matched on the graph, not on names: the embedding `Gather` of a
2-D float table, the residual `Add`s whose other operand is a MatMul with a
constant weight, RMSNorms written out op by op (x·(1/√(mean(x²)+ε)), then an
optional per-channel scale). When anything else reads the stream (a
LayerNormalization, which subtracts the mean and is not rotation-invariant, a
bias, a graph output), the pass emits a remark and leaves the model unchanged.

Massive activations (Sun et al., "Massive Activations in Large Language Models", 2024): a few
fixed channels of the residual stream carry values orders of magnitude above the rest at a few
positions (the first token, delimiters). SmolLM2's channel 507 reaches 2.2e4 where the median
channel's largest value is about 100. Rotated, such a value is spread over every channel (about
900 in each), and float32 then rounds every channel of that position at that scale (6e-5 apart),
far more coarsely than the rest of its content needs: the logits moved by 6.8e-4 there.
`keep-massive` leaves those channels out of the rotation: Q is the identity on them and
orthogonal on the other channels (a permuted block-diagonal orthogonal matrix, so the invariance
is exact). `auto` measures the largest |x| of each channel over every residual-stream value (the
embedding output and each residual Add) on the calibration data, or, without `--calib`, on a
seeded probe of random token ids (massive activations do not depend on the input: Sun et al.
find them at the starting token of any text), and keeps the channels whose largest value is at
least `massive-ratio` times the median channel's. Q on the other channels is the full-width Q
composed with one Householder reflection per kept channel c, the one that maps Q·e_c back to
e_c: each reflection fixes the channels kept before it, and it changes every other entry of a
randomized Hadamard by about 1/n, so the remaining block is still flat (entries ±1/√n ± ~1/n:
the incoherence a Hadamard gives), which a random orthogonal matrix of the odd order n − k
(575 = 23·25 has no Hadamard) would not be (its largest entries are several times 1/√n).

Hadamard matrices of order n are built as Kronecker products of Sylvester
(powers of two) and Paley type I matrices (q + 1, q a prime ≡ 3 mod 4): SmolLM2's
576 = 12·48 and 1536 = 12·128. Where no such product exists the pass uses a
random orthogonal matrix (QR of a Gaussian) and says so. Deterministic: Q
depends only on n and `seed`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import cache
from typing import Literal

import numpy as np

from optc.errors import UsageError, first_line
from optc.ir import Model, Node, Value, annotate, annotation, constant_array, tensor
from optc.ir.annotations import PROVENANCE, SOURCE_ALIASES, SOURCE_NAME, SOURCE_TRANSPOSED
from optc.ir.patterns.builder import Builder, drop_unused_initializers
from optc.ir.patterns.match import ONNX_DOMAINS, const_value, int_attr, producer
from optc.ir.patterns.ops import (
    DATA_MOVEMENT_OPS,
    LAYOUT_OPS,
    NORM_OPS,
    NORM_PATH_OPS,
    REDUCTION_OPS,
)
from optc.passes.infra.analysis import AnalysisManager
from optc.passes.infra.options import option
from optc.passes.infra.pass_base import Pass, PassResult
from optc.passes.infra.registry import register_pass

# --------------------------------------------------------------------------- rotation matrices


def _is_prime(n: int) -> bool:
    return n >= 2 and all(n % p for p in range(2, int(n**0.5) + 1))


def _paley(q: int) -> np.ndarray:
    """Paley type I Hadamard matrix of order q + 1 (q prime, q ≡ 3 mod 4)."""
    residues = {(i * i) % q for i in range(1, q)}
    chi = np.array([0] + [1 if i in residues else -1 for i in range(1, q)], dtype=np.float64)
    jacobsthal = chi[np.subtract.outer(np.arange(q), np.arange(q)).T % q]  # [i, j] = chi(j - i)
    s = np.zeros((q + 1, q + 1))
    s[0, 1:], s[1:, 0], s[1:, 1:] = 1.0, -1.0, jacobsthal
    return s + np.eye(q + 1)


@cache
def hadamard_factors(n: int) -> tuple[int, ...] | None:
    """Orders whose Kronecker product is n, each a power of two or a Paley order; None if there is none."""
    if n == 1:
        return ()
    if n & (n - 1) == 0:
        return (n,)
    for m in range(4, n + 1, 4):
        if n % m == 0 and m & (m - 1) and _is_prime(m - 1) and (m - 1) % 4 == 3:
            rest = hadamard_factors(n // m)
            if rest is not None:
                return (m, *rest)
    return None


def _hadamard_block(order: int) -> np.ndarray:
    if order & (order - 1) == 0:
        h = np.ones((1, 1))
        while h.shape[0] < order:
            h = np.block([[h, h], [h, -h]])
        return h
    return _paley(order - 1)


def hadamard(n: int) -> np.ndarray | None:
    """A normalized (orthogonal) Hadamard matrix of order n, or None when none is built for n."""
    orders = hadamard_factors(n)
    if orders is None:
        return None
    h = np.ones((1, 1))
    for order in orders:
        h = np.kron(h, _hadamard_block(order))
    return h / np.sqrt(n)


def rotation(n: int, seed: int, kind: str) -> tuple[np.ndarray, str]:
    """An orthogonal [n, n] matrix and its description: diag(±1)·H/√n (randomized Hadamard) or a random orthogonal Q."""
    rng = np.random.default_rng(seed)
    h = hadamard(n) if kind == "hadamard" else None
    if h is not None:
        signs = rng.choice([-1.0, 1.0], size=n)
        return signs[:, None] * h, "randomized Hadamard"
    q, r = np.linalg.qr(rng.standard_normal((n, n)))
    return q * np.sign(np.diag(r)), "random orthogonal" + (" (no Hadamard of this order)" if kind == "hadamard" else "")


def fix_channels(q: np.ndarray, keep: list[int]) -> np.ndarray:
    """`q` made the identity on the channels `keep` and orthogonal on the others.

    For each kept channel c in turn, the Householder reflection P that maps u = Q·e_c to e_c (P = I − 2vvᵀ/vᵀv,
    v = u − e_c) gives P·Q with e_c fixed; u is orthogonal to the channels fixed before (Q fixes them and is
    orthogonal), so is v, and P fixes them too. The kept rows and columns are then set exactly to the unit vectors.
    """
    q = np.array(q, dtype=np.float64)
    for c in keep:
        v = q[:, c].copy()
        v[c] -= 1.0
        norm = float(v @ v)
        if norm > 1e-24:
            q -= (2.0 / norm) * np.outer(v, v @ q)
        q[c, :], q[:, c] = 0.0, 0.0
        q[c, c] = 1.0
    return q


# --------------------------------------------------------------------------- matching


@dataclass
class _Norm:
    """An RMSNorm of the stream: its output `out` (after the scale, if any) and the layers reading it."""

    scale_mul: Node | None  # Mul(normalized, g)
    scale_index: int  # input of scale_mul holding g
    readers: list[Node]  # MatMul(out, W) with W a constant [H, N]
    heads: list[Node]  # MatMul(out, Transpose(table)): a tied lm_head

    @property
    def scale(self) -> np.ndarray | None:
        return None if self.scale_mul is None else const_value(self.scale_mul.inputs[self.scale_index])


@dataclass
class _Stream:
    table: Value
    gathers: list[Node]
    hidden: int
    writers: list[Node] = dataclasses.field(default_factory=list)  # MatMul(x, W) added to the stream
    norms: list[_Norm] = dataclasses.field(default_factory=list)


def _weight(node: Node) -> np.ndarray | None:
    """The constant 2-D float weight of a MatMul(x, W), else None."""
    if node.op_type != "MatMul" or node.domain not in ONNX_DOMAINS or len(node.inputs) != 2:
        return None
    w = constant_array(node.inputs[1])
    return w if w is not None and w.ndim == 2 and np.issubdtype(w.dtype, np.floating) else None


def _embedding_gathers(model: Model) -> list[tuple[Value, list[Node]]]:
    tables: dict[int, tuple[Value, list[Node]]] = {}
    for node in model.graph:
        if node.op_type != "Gather" or node.domain not in ONNX_DOMAINS or int_attr(node, "axis", 0) != 0:
            continue
        table = constant_array(node.inputs[0])
        if table is None or table.ndim != 2 or not np.issubdtype(table.dtype, np.floating) or const_value(node.inputs[1]) is not None:
            continue
        tables.setdefault(id(node.inputs[0]), (node.inputs[0], []))[1].append(node)
    return list(tables.values())


def _reaches_square_mean(value: Value | None, x: Value, depth: int = 6) -> bool:
    """True when `value` is computed from mean(x²) (or another reduction of x²) through norm-path ops."""
    node = value.producer() if value is not None else None
    if node is None or depth == 0:
        return False
    if node.op_type in REDUCTION_OPS:
        square = node.inputs[0].producer() if node.inputs[0] is not None else None
        if node.op_type == "ReduceSumSquare":
            return node.inputs[0] is x
        if square is None:
            return False
        if square.op_type == "Pow" and square.inputs[0] is x:
            exponent = const_value(square.inputs[1])
            return exponent is not None and exponent.size == 1 and float(exponent.reshape(-1)[0]) == 2.0
        return square.op_type == "Mul" and square.inputs[0] is x and square.inputs[1] is x
    if node.op_type not in NORM_PATH_OPS:
        return False
    return any(_reaches_square_mean(v, x, depth - 1) for v in node.inputs if v is not None and const_value(v) is None)


def _norm_statistic(node: Node, x: Value) -> bool:
    """`node` belongs to the statistic of an RMSNorm of x (the square, or what reads it)."""
    if node.op_type in ("Pow", "ReduceSumSquare"):
        return True
    return node.op_type == "Mul" and node.inputs[0] is x and node.inputs[1] is x


def _match_norm(use_node: Node, x: Value, hidden: int, table: Value) -> _Norm | str:
    """The RMSNorm whose normalizing Mul/Div is `use_node`, with its readers; or why it is not one."""
    other = [v for v in use_node.inputs if v is not x]
    if len(other) != 1 or not _reaches_square_mean(other[0], x):
        return f"the residual stream is read by {use_node.op_type} ({use_node.name})"
    if use_node.op_type == "Div" and use_node.inputs[0] is not x:
        return f"the residual stream is read by {use_node.op_type} ({use_node.name})"
    out = use_node.outputs[0]
    scale_mul, scale_index = None, 0
    uses = list(out.uses())
    if len(uses) == 1 and uses[0].node.op_type == "Mul" and not out.is_graph_output():
        mul = uses[0].node
        index = 1 - uses[0].idx
        g = const_value(mul.inputs[index])
        if g is not None and np.issubdtype(g.dtype, np.floating) and g.size in (1, hidden) \
                and all(d == 1 for d in g.shape[:-1]):
            scale_mul, scale_index, out = mul, index, mul.outputs[0]
    if out.is_graph_output():
        return "a normalized residual stream is a graph output"
    readers, heads = [], []
    for use in out.uses():
        node = use.node
        if use.idx != 0:
            return f"a norm output is read by {node.op_type} ({node.name}) as its input {use.idx}"
        w = _weight(node)
        if w is not None and w.shape[0] == hidden and node.inputs[1] is not out:
            if node not in readers:
                readers.append(node)
            continue
        transpose = producer(node.inputs[1], "Transpose") if node.op_type == "MatMul" and len(node.inputs) == 2 else None
        if transpose is not None and transpose.inputs[0] is table and len(list(transpose.outputs[0].uses())) == 1:
            heads.append(node)
            continue
        return f"a norm output is read by {node.op_type} ({node.name}), not a linear layer"
    if not readers and not heads:
        return "a norm of the stream has no linear reader"
    return _Norm(scale_mul, scale_index, readers, heads)


def find_stream(model: Model) -> _Stream | str:
    """The residual stream of a pre-norm decoder: its table, writers and norms; else why not (one phrase)."""
    found = _embedding_gathers(model)
    if not found:
        return "no embedding Gather of a 2-D float table"
    if len(found) > 1:
        return f"{len(found)} embedding tables (summed embeddings are not matched)"
    table, gathers = found[0]
    hidden = int(constant_array(table).shape[1])
    stream = _Stream(table, gathers, hidden)
    queue = [g.outputs[0] for g in gathers]
    seen: set[int] = {id(v) for v in queue}
    adds: set[int] = set()
    while queue:
        x = queue.pop()
        if x.is_graph_output():
            return "the residual stream is a graph output"
        normalizers = []
        for use in x.uses():
            node = use.node
            if node.domain not in ONNX_DOMAINS:
                return f"the residual stream is read by {node.domain}.{node.op_type}"
            if node.op_type in NORM_OPS:
                return f"the residual stream is read by {node.op_type}, which is not rotation-invariant"
            if node.op_type == "Add" and len(node.inputs) == 2:
                if id(node) in adds:
                    continue
                other = node.inputs[1 - use.idx]
                if id(other) not in seen:
                    writer = other.producer() if other is not None else None
                    if writer is None or _weight(writer) is None or _weight(writer).shape[1] != hidden \
                            or len(list(other.uses())) != 1 or other.is_graph_output():
                        return f"the residual Add {node.name} adds something other than a linear layer's output"
                    stream.writers.append(writer)
                adds.add(id(node))
                out = node.outputs[0]
                if id(out) not in seen:
                    seen.add(id(out))
                    queue.append(out)
                continue
            if _norm_statistic(node, x):
                continue
            if node.op_type in ("Mul", "Div"):
                normalizers.append(node)
                continue
            return f"the residual stream is read by {node.op_type} ({node.name})"
        for node in normalizers:
            norm = _match_norm(node, x, hidden, table)
            if isinstance(norm, str):
                return norm
            stream.norms.append(norm)
    if not stream.norms:
        return "no RMSNorm reads the residual stream"
    head_transposes = [h.inputs[1].producer() for n in stream.norms for h in n.heads]
    extra = [u.node for u in table.uses() if u.node not in gathers and u.node not in head_transposes]
    if extra:
        return f"the embedding table is also read by {extra[0].op_type} ({extra[0].name})"
    return stream


def _walk_up(value: Value | None, through: frozenset[str] | set[str], limit: int = 8) -> tuple[Node | None, list[Node]]:
    """The first producer of `value` not in `through` (data-movement ops skipped), and the ops skipped."""
    path = []
    for _ in range(limit):
        node = value.producer() if value is not None else None
        if node is None or node.op_type not in through:
            return node, path
        path.append(node)
        value = node.inputs[0]
    return None, path


def _value_output_pair(o_proj: Node) -> tuple[Node, int] | None:
    """(v_proj, head size) when `o_proj` reads attention's weighted sum of v_proj's output, else None."""
    attention, _ = _walk_up(o_proj.inputs[0], LAYOUT_OPS)
    if attention is None or attention.op_type != "MatMul" or any(const_value(v) is not None for v in attention.inputs):
        return None
    v_proj, path = _walk_up(attention.inputs[1], DATA_MOVEMENT_OPS)
    if v_proj is None or _weight(v_proj) is None:
        return None
    reshapes = [n for n in path if n.op_type == "Reshape"]
    head = _head_size(reshapes[-1]) if reshapes else None  # the first Reshape after v_proj splits the heads
    if head is None or head <= 1:
        return None
    if _weight(v_proj).shape[1] % head or _weight(o_proj).shape[0] % head:
        return None
    return v_proj, head


def _head_size(reshape: Node) -> int | None:
    """The last dimension a head-splitting Reshape produces: from its output's shape, else its constant shape."""
    shape = reshape.outputs[0].shape
    if shape is not None and len(shape) >= 2 and isinstance(shape[-1], int):
        return int(shape[-1])
    target = const_value(reshape.inputs[1])
    if target is None or target.ndim != 1 or target.size < 2:
        return None
    return int(target[-1])


# --------------------------------------------------------------------------- the pass


#: The `kind` option's help.
KIND_HELP = "hadamard: diag(±1)·H/√n (orthogonal where no Hadamard of the order is built); orthogonal: QR of a Gaussian"


#: The `keep-massive` option's help.
KEEP_HELP = ("residual channels left out of the rotation (massive activations): auto (measured on --calib, else on a random-token "
             "probe), none, or channel indices joined by '+' (e.g. 507+199)")

#: The probe `keep-massive=auto` runs without calibration data: samples × tokens of random token ids.
PROBE_SAMPLES, PROBE_SEQLEN = 4, 64


@register_pass("rotate")
class Rotate(Pass):
    """Rotate a decoder's residual stream (and optionally heads, FFN) by random Hadamards fused into the weights."""

    @dataclass
    class Options:
        seed: int = option(0, help="seed of the random signs (or random orthogonal matrix)")
        kind: Literal["hadamard", "orthogonal"] = option("hadamard", help=KIND_HELP)
        heads: bool = option(True, help="also rotate each attention head between the value and output projections")
        online: bool = option(False, help="insert a Hadamard before each FFN down projection (two small MatMuls at run time)")
        untie: bool = option(
            True, help="give a tied lm_head its own rotated initializer; false keeps one table and adds an [H,H] MatMul before the head"
        )
        keep_massive: str = option("auto", help=KEEP_HELP)
        massive_ratio: float = option(
            100.0, at_least=1.0, help="keep-massive=auto keeps a channel whose largest |x| is at least this times the median channel's"
        )

    def run(self, model: Model, am: AnalysisManager) -> PassResult:
        stream = find_stream(model)
        if isinstance(stream, str):
            am.context.remark("missed", f"0 of 1 residual streams rotated: {stream}", matched_none=True)
            return PassResult(model, False, None, {"weights-rotated": 0})
        opts = self.options
        q, how = rotation(stream.hidden, opts.seed, opts.kind)
        keep = self._massive_channels(model, am, stream)
        if keep:
            q = fix_channels(q, keep)
            how += f", channels {'+'.join(map(str, keep))} kept"
        build = Builder(model.graph)
        touched: list[Value] = []
        counts = {"weights-rotated": 0, "norms-folded": 0, "heads-rotated": 0, "online-hadamards": 0}
        # Every weight is composed in float64 (per-head, online and stream rotations, norm scales) and rounded
        # to its dtype once at the end: v and o projections used to be rounded after the per-head rotation and
        # again after Q.
        exact: dict[int, tuple[Node, np.ndarray]] = {}

        def weight64(node: Node) -> np.ndarray:
            return exact[id(node)][1] if id(node) in exact else _weight(node).astype(np.float64)

        def put(node: Node, weight: np.ndarray) -> None:
            exact[id(node)] = (node, weight)

        # Per-head and online rotations first: they read the original weights' shapes only.
        if opts.heads:
            for o_proj in stream.writers:
                pair = _value_output_pair(o_proj)
                if pair is None:
                    continue
                v_proj, head = pair
                r, _ = rotation(head, opts.seed + 1, opts.kind)
                wv, wo = weight64(v_proj), weight64(o_proj)
                put(v_proj, (wv.reshape(wv.shape[0], -1, head) @ r).reshape(wv.shape))
                put(o_proj, (r.T @ wo.reshape(-1, head, wo.shape[1])).reshape(wo.shape))
                counts["heads-rotated"] += 1
        if opts.online:
            for down in stream.writers:
                if producer(down.inputs[0], "Mul") is None:  # the gated MLP's product, not attention's output
                    continue
                rotated = _insert_online_hadamard(build, down, weight64(down))
                if rotated is not None:
                    put(down, rotated)
                    counts["online-hadamards"] += 1
        for writer in stream.writers:
            put(writer, weight64(writer) @ q)
            counts["weights-rotated"] += 1
        table = constant_array(stream.table)
        for norm in stream.norms:
            g = norm.scale
            gvec = np.ones(stream.hidden) if g is None else np.broadcast_to(g.astype(np.float64).reshape(-1), (stream.hidden,))
            for reader in norm.readers:
                put(reader, q.T @ (gvec[:, None] * weight64(reader)))
                counts["weights-rotated"] += 1
            for head in norm.heads:
                self._rotate_head(build, stream, head, q, gvec, table)
                counts["weights-rotated"] += 1
            if norm.scale_mul is not None:
                touched.append(_set_input(build, norm.scale_mul, norm.scale_index, np.ones_like(g)))
                counts["norms-folded"] += 1
        touched += [_set_weight(build, node, weight) for node, weight in exact.values()]
        rotated_table = (table.astype(np.float64) @ q).astype(table.dtype)
        stream.table.const_value = tensor(rotated_table, name=stream.table.name)
        for node in (*stream.writers, *(r for n in stream.norms for r in n.readers), *stream.gathers):
            annotate(node, PROVENANCE, "rotate")
        drop_unused_initializers(model.graph, touched)
        am.context.remark("passed", f"rotated the residual stream (hidden {stream.hidden}, {how}): {len(stream.norms)} norms, "
                                    f"{len(stream.writers)} residual writers, {counts['heads-rotated']} attention blocks per head, "
                                    f"{counts['online-hadamards']} online Hadamards")
        if opts.heads and not counts["heads-rotated"]:
            am.context.remark("missed", "0 attention blocks rotated per head: no value/output projection pair found")
        return PassResult(model, True, None, counts)

    def _massive_channels(self, model: Model, am: AnalysisManager, stream: _Stream) -> list[int]:
        """The residual channels `keep-massive` leaves out of the rotation, in ascending order."""
        text = self.options.keep_massive.strip().lower()
        if text == "none":
            return []
        if text != "auto":
            try:
                keep = sorted({int(part) for part in text.replace(",", "+").split("+") if part.strip()})
            except ValueError:
                raise UsageError(f"rotate: keep-massive={self.options.keep_massive!r} is not auto, none or channel indices "
                                 "joined by '+'") from None
            if any(not 0 <= c < stream.hidden for c in keep):
                raise UsageError(f"rotate: keep-massive={text}: the residual stream has channels 0 to {stream.hidden - 1}")
            return keep
        measured = _stream_channel_max(model, am, stream)
        if measured is None:
            return []
        largest, where = measured
        median = float(np.median(largest))
        ratio = largest / max(median, np.finfo(np.float64).tiny)
        keep = sorted(int(c) for c in np.nonzero(ratio >= self.options.massive_ratio)[0])
        found = ", ".join(f"{c} ({largest[c]:.3g}, {ratio[c]:.0f}x)" for c in keep) or "none"
        am.context.remark("analysis", f"massive residual channels on {where} (largest |x|, x the median channel's "
                                      f"{median:.3g}; kept at {self.options.massive_ratio:g}x and above): {found}")
        return keep

    def _rotate_head(self, build: Builder, stream: _Stream, head: Node, q: np.ndarray, g: np.ndarray, table: np.ndarray) -> None:
        """The tied lm_head MatMul(x, Transpose(T)) after T became T·Q: untie it, or put Qᵀ·diag(g)·Q before it."""
        transpose = head.inputs[1].producer()
        if self.options.untie:
            weight = (q.T @ (g[:, None] * table.astype(np.float64).T)).astype(table.dtype)
            aliases = list(annotation(stream.table, SOURCE_ALIASES) or [])
            name = next((a for a in aliases if "lm_head" in a), aliases[0] if aliases else "lm_head.weight")
            value = build.initializer(name, weight)
            annotate(value, SOURCE_NAME, name)
            annotate(value, SOURCE_TRANSPOSED, True)
            if name in aliases:
                aliases.remove(name)
                annotate(stream.table, SOURCE_ALIASES, aliases)
            head.replace_input_with(1, value)
            if not transpose.outputs[0].uses():
                build.graph.remove(transpose, safe=True)
        else:
            mix = (q.T @ (g[:, None] * q)).astype(table.dtype)
            matrix = build.initializer(f"{head.name}_rotate", mix)
            mul = build.node("MatMul", [head.inputs[0], matrix], name=f"{head.name}_rotate", outputs=[f"{head.name}_rotated"])
            mul.outputs[0].dtype, mul.outputs[0].shape = head.inputs[0].dtype, head.inputs[0].shape
            annotate(mul, PROVENANCE, "rotate")
            build.graph.insert_before(head, [mul])
            head.replace_input_with(0, mul.outputs[0])
        annotate(head, PROVENANCE, "rotate")


def stream_values(stream: _Stream) -> list[str]:
    """The names of every residual-stream value: the embedding outputs and each residual Add's output."""
    names = [g.outputs[0].name for g in stream.gathers]
    for writer in stream.writers:
        names += [use.node.outputs[0].name for use in writer.outputs[0].uses() if use.node.op_type == "Add"]
    return list(dict.fromkeys(names))


def _stream_channel_max(model: Model, am: AnalysisManager, stream: _Stream) -> tuple[np.ndarray, str] | None:
    """The largest |x| of each residual channel over every stream value, and what it was measured on.

    On the calibration data when the context names some, else on PROBE_SAMPLES × PROBE_SEQLEN random token ids
    (drawn below the table's row count); None, after a `missed` remark, when the probe cannot run."""
    from optc.passes.infra.blockwise import calibrate
    from optc.runtime.calibration import iter_samples
    from optc.runtime.runner import ModelRunner

    largest = np.zeros(stream.hidden)

    def update(_name: str, array: np.ndarray) -> None:
        np.maximum(largest, np.abs(np.asarray(array, dtype=np.float64).reshape(-1, stream.hidden)).max(axis=0), out=largest)

    names = stream_values(stream)
    context = am.context
    if context.get("calibration.spec"):
        calibrate(model, context, names, update)
        return largest, f"the calibration data ({context.get('calibration.spec')})"
    rows = int(constant_array(stream.table).shape[0])
    rng = np.random.default_rng(context.seed)
    ids = {g.inputs[1].name for g in stream.gathers if g.inputs[1] is not None and g.inputs[1].producer() is None}
    try:
        with ModelRunner(model, names) as runner:
            for feed in iter_samples(model, "random", PROBE_SAMPLES, PROBE_SEQLEN, seed=context.seed):
                for name in ids & set(feed):
                    feed[name] = rng.integers(0, rows, size=feed[name].shape).astype(feed[name].dtype)
                for name, array in runner.run(feed, names).items():
                    update(name, array)
    except Exception as exc:  # noqa: BLE001 - onnxruntime and the random feeds raise their own types
        am.context.remark("missed", f"keep-massive=auto: no calibration data and the random-token probe failed "
                                    f"({first_line(exc, limit=None)}); "
                                    "no channel kept (give --calib or keep-massive=<channels>)")
        return None
    return largest, f"a probe of {PROBE_SAMPLES}x{PROBE_SEQLEN} random token ids (no calibration data)"


def _set_input(build: Builder, node: Node, index: int, array: np.ndarray) -> Value:
    """Give input `index` of `node` the constant `array`: in place when only it reads the value, else a copy.

    Returns the old value (a candidate for the sweep of unused initializers)."""
    value = node.inputs[index]
    dtype = constant_array(value).dtype
    array = np.asarray(array).astype(dtype)
    uses = list(value.uses())
    if len(uses) == 1 and not value.is_graph_output() and value.name in build.graph.initializers:
        value.const_value = tensor(array, name=value.name)
        return value
    new = build.initializer(f"{value.name}_rotated", array)
    for key, item in value.metadata_props.items():
        new.metadata_props[key] = item
    node.replace_input_with(index, new)
    return value


def _set_weight(build: Builder, node: Node, weight: np.ndarray) -> Value:
    return _set_input(build, node, 1, weight)


def _exact_hadamard(order: int) -> tuple[np.ndarray, float]:
    """A Hadamard factor whose entries are ±2⁻ᵉ (exact in every float format) and its gain over the orthogonal one.

    The factor is `gain` times the normalized Hadamard matrix of `order`; `gain` is folded into the weight
    after it, so rounding the factor to the activation dtype changes nothing.
    """
    if order == 1:
        return np.ones((1, 1)), 1.0
    exponent = round(np.log2(order) / 2)
    unit = 2.0**-exponent
    block = np.ones((1, 1))
    for part in hadamard_factors(order) or ():
        block = np.kron(block, _hadamard_block(part))
    return block * unit, float(np.sqrt(order) * unit)


def _insert_online_hadamard(build: Builder, down: Node, w: np.ndarray) -> np.ndarray | None:
    """x ↦ x·(A⊗B) before `down` as Reshape, MatMul(·, B), MatMul(A, ·), Reshape.

    `w` is down's weight in float64; returns (A⊗B)⁻¹·w (float64, for the caller to round once), or None
    when nothing was inserted."""
    x = down.inputs[0]
    width = w.shape[0]
    orders = hadamard_factors(width)
    if orders is None or x.shape is None or len(x.shape) != 3:
        return None
    a = orders[0] if len(orders) > 1 and orders[0] & (orders[0] - 1) else 1
    b = width // a
    (big_a, gain_a), (big_b, gain_b) = _exact_hadamard(a), _exact_hadamard(b)
    dtype = _weight(down).dtype
    name = down.name or "down"
    split = build.initializer(f"{name}_hadamard_split", np.array([0, 0, a, b], dtype=np.int64))
    merge = build.initializer(f"{name}_hadamard_merge", np.array([0, 0, width], dtype=np.int64))
    right = build.initializer(f"{name}_hadamard_b", big_b.astype(dtype))
    nodes = [build.node("Reshape", [x, split], name=f"{name}_hadamard_split", outputs=[f"{name}_hadamard_in"])]
    nodes.append(build.node("MatMul", [nodes[-1].outputs[0], right], name=f"{name}_hadamard_b", outputs=[f"{name}_hadamard_xb"]))
    if a > 1:
        left = build.initializer(f"{name}_hadamard_a", big_a.T.astype(dtype))
        nodes.append(build.node("MatMul", [left, nodes[-1].outputs[0]], name=f"{name}_hadamard_a", outputs=[f"{name}_hadamard_axb"]))
    nodes.append(build.node("Reshape", [nodes[-1].outputs[0], merge], name=f"{name}_hadamard_merge", outputs=[f"{name}_hadamard"]))
    for node in nodes:
        node.outputs[0].dtype = x.dtype
        annotate(node, PROVENANCE, "rotate")
    nodes[-1].outputs[0].shape = x.shape
    build.graph.insert_before(down, nodes)
    down.replace_input_with(0, nodes[-1].outputs[0])
    # With X the activation reshaped to [a, b], x·(A⊗B) is Aᵀ·X·B. A⊗B is gain·H with H orthogonal, so
    # x·(A⊗B)·W' = x·W needs W' = Hᵀ·W / gain, computed in float64 and rounded once (by the caller).
    gain = gain_a * gain_b
    return (np.kron(big_a, big_b) / gain).T @ w.astype(np.float64) / gain


__all__ = ["Rotate", "find_stream", "fix_channels", "stream_values", "hadamard", "hadamard_factors", "rotation"]
