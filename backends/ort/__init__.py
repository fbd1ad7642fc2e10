"""The ONNX Runtime backend: writes ONNX (external data when large) and opens a session on it."""

from __future__ import annotations

from pathlib import Path

from optc.backends.base import Artifact, Backend, register_backend
from optc.backends.ort import genai
from optc.ir import Model, model_size_bytes, save_model, verify
from optc.passes.infra.context import PassContext
from optc.runtime.ort import runtime_check


@register_backend
class OrtBackend(Backend):
    """ONNX for onnxruntime; the file is loaded into an InferenceSession before it is kept."""

    name = "ort"
    suffixes = (".onnx",)
    #: 8-bit Q/DQ rewritten into the forms onnxruntime's CPU kernels run fastest, exactly
    #: (backends/ort/lower_ort_int8.py; measured by tools/bench_ort_int8_forms.py).
    #: Weight-only 2-4-bit MatMuls run as MatMulNBits (backends/ort/lower_ort_nbits.py; tools/bench_w4.py);
    #: 5-8-bit weight-only weights are folded to float at load by lower-ort-int8 (faster than MatMulNBits bits=8).
    #: A KV-cache decoder's rotary attention runs as GroupQueryAttention (backends/ort/fuse_ort.py;
    #: tools/bench_decode.py).
    #: A Relu read only by an FP8 quantizer moves after the pair, which onnxruntime's optimizer
    #: otherwise drops (backends/ort/lower_ort_fp8.py).
    legalize = "fuse-ort,lower-ort-fp8,lower-ort-nbits,lower-ort-int8"

    def lower(self, model: Model, output: Path, context: PassContext) -> Artifact:
        verify(model, where="before lowering to ort")
        checks: list[str] = []
        generation = genai.is_generation_model(model)

        def check(staged: Path) -> None:
            if generation:  # the whole folder, staged beside the staged model, for onnxruntime-genai's check
                genai.write_generation_files(model, staged)
            if not context.get("backend.skip_runtime_check"):
                checks.append(runtime_check(staged, output, "lowered"))
                if generation and (line := genai.genai_check(staged.parent)) is not None:
                    checks.append(line.replace(str(staged.parent), str(output.parent)))

        path = save_model(model, output, check=check)
        if generation:
            genai.write_generation_files(model, output)
        return Artifact(path, self.name, model_size_bytes(path), checks)

    def written_files(self, output: Path, *, generation: bool = False) -> list[tuple[Path, str]]:
        files = super().written_files(output)
        if generation:
            files += [(output.with_name(name), f"the generation-ready folder's {name}") for name in genai.GENERATION_FILES]
        return files

# The target's passes register on import (after the backend, which they may use).
from optc.backends.ort import fuse_ort, lower_ort_fp8, lower_ort_int8, lower_ort_nbits  # noqa: E402, F401
