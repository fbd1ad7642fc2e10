"""`distill`: knowledge distillation — fine-tune the IR's float weights to match a teacher's outputs.

The student is the current IR run by the PyTorch executor
(`optc.runtime.torch_exec.TorchExecutor`) with its float weights as parameters; the
teacher is the model as it entered the pipeline (`teacher=input`) or a model file
(`teacher=PATH`). Each step takes one calibration sample and minimises

    α·T²·KL(softmax(z_t/T) ‖ softmax(z_s/T)) + (1 − α)·CE(z_s, next tokens)

(the KL term alone for a model that is not a causal LM: `is_causal_lm`) with Adam, batch 1, fp32.
Zeros of pruned weights (annotated `sparsity`, or at least 5% exactly zero) stay
zero; shapes, the graph, quantized weights and unnamed buffers are untouched. The
trained weights are written back into the initializers; the run is deterministic
for a given model, data and `--seed`. `threads=1` is the default (a busy 2-core
machine's threads wait for each other); cost and results: README (Distillation).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from optc.errors import OptcError
from optc.ir import Model
from optc.ir.annotations import SPARSITY
from optc.passes.infra.analysis import STRUCTURE, AnalysisManager, PreservedAnalyses
from optc.passes.infra.options import option
from optc.passes.infra.pass_base import Pass, PassResult
from optc.passes.infra.registry import register_pass

if TYPE_CHECKING:
    import torch

    from optc.runtime.torch_exec import TorchExecutor

#: Passes that leave quantized weights or activations behind; distilling after them is flagged.
QUANTIZING_PASSES = frozenset({
    "quantize", "rtn", "gptq", "awq", "kquant", "lower-ort-int8", "lower-ort-nbits", "lower-tensorrt",
})
#: Gradient-norm clip applied before every step.
CLIP_NORM = 1.0
#: A weight with at least this fraction of exact zeros counts as pruned (its zeros stay).
PRUNED_FRACTION = 0.05


def is_quantizing(pass_: Pass) -> bool:
    """True for a pass that quantizes (by name, or a plugin class with `quantizes = True`)."""
    return pass_.name in QUANTIZING_PASSES or bool(getattr(type(pass_), "quantizes", False))


@register_pass("distill")
class Distill(Pass):
    """Knowledge distillation: fine-tune the float weights to match a teacher on the calibration data."""

    #: The pass manager snapshots the pipeline's input model for passes that set this.
    uses_input_model: ClassVar[bool] = True

    @dataclass
    class Options:
        steps: int = option(100, help="optimizer steps, one calibration sample each (samples repeat when fewer)")
        temperature: float = option(2.0, help="softmax temperature T of the KL term")
        alpha: float = option(0.5, help="weight of the T²-scaled KL term; 1 - alpha weighs the next-token cross-entropy")
        lr: float = option(1e-4, help="Adam learning rate")
        teacher: str = option("input", help="'input': the model as it entered the pipeline; or a model path (.onnx, .gguf, HF directory)")
        device: str = option("auto", help="torch device: auto (cuda when available, else cpu), cpu, cuda, cuda:N")
        threads: int = option(1, help="torch CPU threads (0: torch's default); the result is reproducible for a fixed count")

        def validate(self) -> None:
            if self.steps < 1:
                raise ValueError(f"option 'steps' must be at least 1, got {self.steps}")
            if not self.temperature > 0:
                raise ValueError(f"option 'temperature' must be positive, got {self.temperature}")
            if not 0.0 <= self.alpha <= 1.0:
                raise ValueError(f"option 'alpha' must be in [0, 1], got {self.alpha}")
            if not self.lr > 0:
                raise ValueError(f"option 'lr' must be positive, got {self.lr}")
            if not self.teacher:
                raise ValueError("option 'teacher' must be 'input' or a model path")
            if self.threads < 0:
                raise ValueError(f"option 'threads' must be 0 (torch's default) or more, got {self.threads}")
            if self.device != "auto" and self.device != "cpu" and not self.device.startswith("cuda"):
                raise ValueError(f"option 'device' must be auto, cpu or cuda[:N], got {self.device!r}")

    def order_warning(self, earlier: Sequence[Pass]) -> str | None:
        quantizer = next((p.name for p in earlier if is_quantizing(p)), None)
        if quantizer is None:
            return None
        return (
            f"the pipeline runs distill after {quantizer}: distillation fine-tunes float weights, but quantized weights are "
            "frozen integers and activation rounding passes no gradient, so little can be recovered and the quantization "
            "grid is not refitted; distill before quantizing (prune -> distill -> quantize, as the p-kd-q pipeline does)"
        )

    def run(self, model: Model, am: AnalysisManager) -> PassResult:
        import torch

        from optc.runtime.torch_exec import TorchExecutor, default_trainable

        opts = self.options
        context = am.context
        trainable = default_trainable(model)
        if not trainable:
            raise OptcError("distill: the model has no float weights to train")
        teacher_model = self._teacher(model, am)
        device = _device(opts.device)
        samples = _SampleCycle(model, am)
        with _deterministic(context.seed, device, opts.threads):
            teacher = TorchExecutor(teacher_model, trainable=()).to(device).eval()
            del teacher_model
            student = TorchExecutor(model, trainable=trainable).to(device).train()
            _check_interfaces(student, teacher)
            masks = _masks(model, student)
            optimizer = torch.optim.Adam(student.params, lr=opts.lr)
            start = time.perf_counter()
            losses = self._train(student, teacher, samples, masks, optimizer, device, is_causal_lm(model))
            seconds = time.perf_counter() - start
            student.write_back(model)
        masked = sum(int((~m).sum()) for m in masks.values())
        stats: dict[str, int | float] = {
            "steps": opts.steps,
            "weights-trained": len(student.params),
            "zeros-kept": masked,
            "loss-first": round(losses[0], 4),
            "loss-last": round(float(np.mean(losses[-10:])), 4),
            "steps-per-minute": round(60.0 * opts.steps / max(seconds, 1e-9), 1),
        }
        return PassResult(model, True, PreservedAnalyses().preserve_aspects(STRUCTURE), stats)

    def _teacher(self, model: Model, am: AnalysisManager) -> Model:
        if self.options.teacher == "input":
            snapshot = getattr(am.context, "input_model", None)
            if snapshot is None:
                raise OptcError(
                    "distill: teacher=input needs the model as it entered the pipeline; run distill in a pipeline "
                    "(optc --passes, optc.compile, a PassManager) or give teacher=PATH"
                )
            return snapshot
        load = am.context.get("frontend.load_model")
        if load is None:
            raise OptcError(
                f"distill: teacher={self.options.teacher} is a file, and this pipeline was run without a model "
                "loader; run it through optc or optc.compile, or set the context's frontend.load_model"
            )
        return load(Path(self.options.teacher))

    def _train(self, student: TorchExecutor, teacher: TorchExecutor, samples: _SampleCycle,
               masks: dict[int, torch.Tensor], optimizer: torch.optim.Optimizer, device: torch.device,
               causal_lm: bool) -> list[float]:
        import torch
        from tqdm import tqdm

        opts = self.options
        t, alpha = opts.temperature, opts.alpha
        params = list(student.params)
        losses: list[float] = []
        running: dict[str, float] = {}
        with tqdm(total=opts.steps, desc="distill", unit="step", leave=False, disable=None) as bar:
            for step in range(opts.steps):
                feed = {k: torch.from_numpy(v).to(device) for k, v in samples.next().items()}
                with torch.no_grad():
                    (z_t,) = teacher(feed, teacher.output_names[:1])
                (z_s,) = student(feed, student.output_names[:1])
                if z_s.shape != z_t.shape:
                    raise OptcError(f"distill: student output {list(z_s.shape)} and teacher output {list(z_t.shape)} differ")
                kl = _kl(z_t, z_s, t)
                ce = _next_token_ce(z_s, feed.get("input_ids")) if causal_lm else None
                loss = alpha * t * t * kl + (1.0 - alpha) * ce if ce is not None else t * t * kl
                if not torch.isfinite(loss):
                    raise OptcError(f"distill: the loss is not finite at step {step + 1} ({float(loss)}); lower lr")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                for i, mask in masks.items():
                    if params[i].grad is not None:
                        params[i].grad.mul_(mask)
                torch.nn.utils.clip_grad_norm_(params, CLIP_NORM)
                optimizer.step()
                with torch.no_grad():
                    for i, mask in masks.items():
                        params[i].mul_(mask)
                values = {"loss": float(loss.detach()), "kl": float(kl.detach()), "ce": float(ce.detach()) if ce is not None else math.nan}
                losses.append(values["loss"])
                for key, value in values.items():
                    running[key] = value if key not in running else 0.9 * running[key] + 0.1 * value
                bar.set_postfix({k: f"{v:.4f}" for k, v in running.items() if not math.isnan(v)}, refresh=False)
                bar.update(1)
        return losses


def _masks(model: Model, student: TorchExecutor) -> dict[int, torch.Tensor]:
    """Non-zero masks of the pruned weights: annotated `sparsity`, or at least `PRUNED_FRACTION` exactly zero."""
    from optc.ir import annotation

    masks = {}
    for i, (name, param) in enumerate(zip(student.param_names, student.params, strict=True)):
        value = model.graph.initializers[name]
        nonzero = param.detach() != 0
        annotated = annotation(value, SPARSITY) is not None or any(annotation(c, SPARSITY) is not None for c in value.consumers())
        if annotated or 1.0 - float(nonzero.float().mean()) >= PRUNED_FRACTION:
            masks[i] = nonzero
    return masks


def _kl(z_t: torch.Tensor, z_s: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(z_t/T) ‖ softmax(z_s/T)) over the last axis, averaged over every other position."""
    import torch

    log_t = torch.log_softmax(z_t.float() / temperature, dim=-1).reshape(-1, z_t.shape[-1])
    log_s = torch.log_softmax(z_s.float() / temperature, dim=-1).reshape(-1, z_s.shape[-1])
    return torch.nn.functional.kl_div(log_s, log_t, log_target=True, reduction="batchmean")


def is_causal_lm(model: Model) -> bool:
    """Whether the first output is next-token logits: the registry's task for a Hugging Face model, else an output
    named `logits` (an encoder's hidden states, however shaped, get no next-token cross-entropy)."""
    from optc.architectures import lookup
    from optc.ir import model_metadata
    from optc.ir.annotations import HF_CONFIG

    family = lookup(str((model_metadata(model, HF_CONFIG) or {}).get("model_type", "")))
    if family is not None:
        return family.task == "causal-lm"
    return bool(model.graph.outputs) and "logits" in (model.graph.outputs[0].name or "")


def _next_token_ce(z_s: torch.Tensor, ids: torch.Tensor | None) -> torch.Tensor | None:
    """Cross-entropy of logits `[batch, seq, vocab]` against the next token, or None for a non-LM output."""
    import torch

    if ids is None or z_s.dim() != 3 or ids.dim() != 2 or tuple(z_s.shape[:2]) != tuple(ids.shape) or ids.shape[1] < 2:
        return None
    logits = z_s[:, :-1].reshape(-1, z_s.shape[-1]).float()
    return torch.nn.functional.cross_entropy(logits, ids[:, 1:].reshape(-1))


def _check_interfaces(student: TorchExecutor, teacher: TorchExecutor) -> None:
    missing = [n for n in student.input_names if n not in teacher.input_names]
    if missing:
        raise OptcError(f"distill: the teacher has no input {missing[0]!r} (teacher inputs: {', '.join(teacher.input_names)})")
    extra = [n for n in teacher.input_names if n not in student.input_names]
    if extra:
        raise OptcError(f"distill: the teacher needs input {extra[0]!r}, which the student lacks")


def _device(name: str) -> torch.device:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise OptcError(f"distill: device={name} but torch sees no CUDA device")
    return torch.device(name)


@contextlib.contextmanager
def _deterministic(seed: int, device: torch.device, threads: int) -> Iterator[None]:
    """Seeded torch with `threads` CPU threads for the duration (restored afterwards); deterministic kernels on CUDA.

    PyTorch's CPU kernels used here are deterministic for a fixed thread count already.
    """
    import torch

    state, threads_before = torch.random.get_rng_state(), torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    cuda = device.type == "cuda"
    if cuda:
        previous, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        if cuda:
            torch.use_deterministic_algorithms(previous, warn_only=warn_only)
        torch.random.set_rng_state(state)
        torch.set_num_threads(threads_before)


class _SampleCycle:
    """Calibration samples one at a time, streamed again from the start when they run out."""

    def __init__(self, model: Model, am: AnalysisManager) -> None:
        from optc.passes.infra.calibration import calibration_samples

        self._open = lambda: calibration_samples(model, am.context)
        self._it = self._open()
        self._seen = 0

    def next(self) -> dict[str, np.ndarray]:
        try:
            sample = next(self._it)
        except StopIteration:
            if self._seen == 0:
                raise OptcError("distill: the calibration data has no samples") from None
            self._it = self._open()
            sample = next(self._it)
        self._seen += 1
        return sample
