"""Low-precision variants for CPU inference: bf16 (always, the honest baseline), int8, export.

Which path is fast depends on the CPU: eager torchao int8 is *slower* than
fp32; int8 pays only through Inductor (`torch.compile`, with *freezing* for the pt2e path). The
x86 int8 quantizer annotates Linear and Conv1d/2d, never Conv3d, so on a 3D CNN int8 touches only
the classifier: there the candidates are bf16 with channels_last_3d, and fp32 compiled with
freezing. `benchmarks/compression.py` measures them side by side on this machine.

Schemes:
- ``bf16``: weights and activations in bfloat16 (channels_last_3d for Conv3d models), eager.
- ``int8_dynamic``: torchao ``quantize_(Int8DynamicActivationInt8WeightConfig())`` on every Linear
  except the classifier, then ``torch.compile``. Artifact: the quantized state_dict, written with
  ``torch.save`` and read back with ``torch.load(weights_only=True)`` (torchao's tensor subclasses
  are allow-listed for the restricted loader), so loading never unpickles arbitrary objects. This is
  what a serving process loads (:func:`load_int8_dynamic`).
- ``int8_static``: PT2E: ``torch.export`` -> ``prepare_pt2e(X86InductorQuantizer)`` -> calibration on
  real batches -> ``convert_pt2e`` -> ``torch.compile`` with freezing. Static activation scales from
  the task's data. Its only artifact is a ``.pt2`` (``torch.export.save``), which ``torch.export.load``
  reads with pickle as a fallback: load ``.pt2`` files from trusted stores only.
- ``int8_qat``: the same PT2E path with ``X86InductorQuantizer(is_qat=True)``: fake-quantize
  observers, a short fine-tune (distillation from the teacher in the stage), convert, compile with
  freezing. Same ``.pt2`` artifact as ``int8_static``.
- ``compiled``: the fp32 model through ``torch.compile`` with freezing (what freezing alone gives).

Every variant can be exported with :func:`export_pt2` (dynamic batch dimension).

Pure PyTorch (+ torchao): no ray, no mlflow.
"""

from __future__ import annotations

import contextlib
import copy
import os
from typing import Any, Callable, Dict, Iterable, Mapping, Optional

import torch
from torch import nn

os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")  # CUDA kernels only; silences load errors

SCHEMES = ("bf16", "int8_dynamic", "int8_static", "int8_qat", "compiled")


def has_conv3d(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv3d) for m in model.modules())


class CastInputs(nn.Module):
    """Runs ``model`` on inputs cast to its float dtype (and memory format): the runnable form of a
    low-precision variant, called with the same keyword inputs as the fp32 model."""

    def __init__(self, model: nn.Module, dtype: torch.dtype = torch.float32,
                 memory_format: Optional[torch.memory_format] = None) -> None:
        super().__init__()
        self.model, self.dtype, self.memory_format = model, dtype, memory_format

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        cast = {}
        for k, v in inputs.items():
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                v = v.to(self.dtype)
                if self.memory_format is not None and v.ndim == 5:
                    v = v.contiguous(memory_format=self.memory_format)
            cast[k] = v
        return self.model(**cast).float()


class FrozenCompiled(nn.Module):
    """``torch.compile`` with Inductor *freezing* switched on around every call (weights become
    constants; required for the pt2e int8 kernels; a per-call ``options={"freezing": True}`` fails
    on int8). The switch is scoped, so other compiled code is untouched."""

    def __init__(self, module: nn.Module, freezing: bool = True) -> None:
        super().__init__()
        self.inner = module
        # dynamic=False: one specialised graph per batch size (1, 8, ...), as a server with fixed
        # batch buckets would run; a dynamic-batch graph measured slower at batch 8 here
        self.compiled = torch.compile(module, dynamic=False)
        self.freezing = freezing

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        import torch._inductor.config as icfg

        ctx = icfg.patch(freezing=True) if self.freezing else contextlib.nullcontext()
        with ctx, torch.no_grad():
            return self.compiled(**inputs)


def to_bf16(model: nn.Module, channels_last: Optional[bool] = None) -> CastInputs:
    """A bf16 copy of ``model`` (channels_last_3d when it has Conv3d layers, unless told otherwise)."""
    m = copy.deepcopy(model).eval().to(torch.bfloat16)
    cl = has_conv3d(m) if channels_last is None else channels_last
    fmt = torch.channels_last_3d if cl else None
    if fmt is not None:  # only the 5-D Conv3d weights (Module.to(memory_format=) refuses other ranks)
        for conv in m.modules():
            if isinstance(conv, nn.Conv3d):
                conv.weight.data = conv.weight.data.contiguous(memory_format=fmt)
    return CastInputs(m, torch.bfloat16, fmt)


def _not_classifier(model: nn.Module) -> Callable[[nn.Module, str], bool]:
    from heygen_ray.models import unwrap_model

    head = set(unwrap_model(model).get_classifier().modules())
    return lambda m, fqn: isinstance(m, nn.Linear) and m not in head


def quantize_int8_dynamic(model: nn.Module, *, skip_classifier: bool = True) -> nn.Module:
    """In place: torchao W8A8 (dynamic per-token activations, per-row weights) on the Linear layers.
    Eager, this is slower than fp32: wrap with :func:`compile_frozen` (freezing off) to run it."""
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    model.eval()
    flt = _not_classifier(model) if skip_classifier else (lambda m, fqn: isinstance(m, nn.Linear))
    quantize_(model, Int8DynamicActivationInt8WeightConfig(), filter_fn=flt)
    return model


def int8_linear_count(model: nn.Module) -> int:
    """Linear layers whose weight is a torchao quantized tensor."""
    return sum(1 for m in model.modules() if isinstance(m, nn.Linear) and type(m.weight).__name__ != "Parameter"
               and type(m.weight.data).__name__ not in ("Tensor", "Parameter"))


def save_int8_dynamic(model: nn.Module, path: str) -> str:
    """The quantized state_dict (int8 tensors + scales), loadable with ``weights_only=True``."""
    torch.save(model.state_dict(), path)
    return path


def load_int8_dynamic(fresh: nn.Module, path: str, *, skip_classifier: bool = True) -> nn.Module:
    """Quantize a freshly built model of the same architecture, then load the saved state with the
    restricted loader (no arbitrary unpickling) and ``assign=True`` (keeps the int8 tensor types)."""
    quantize_int8_dynamic(fresh, skip_classifier=skip_classifier)
    state = torch.load(path, map_location="cpu", weights_only=True)
    fresh.load_state_dict(state, assign=True)
    return fresh.eval()


def quantize_int8_static(model: nn.Module, example_inputs: Mapping[str, torch.Tensor],
                         calibration: Iterable[Mapping[str, torch.Tensor]]) -> nn.Module:
    """PT2E static int8 with the x86 Inductor quantizer: export (dynamic batch), calibrate on
    ``calibration`` batches of real inputs, convert. Returns the converted GraphModule (run it through
    :func:`compile_frozen`). Conv3d layers stay fp32 (the quantizer has no conv3d annotation)."""
    import torchao.quantization.pt2e as pt2e
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    model = copy.deepcopy(model).eval()
    with torch.no_grad():
        gm = torch.export.export(model, (), dict(example_inputs), dynamic_shapes=_dynamic_batch(example_inputs)).module()
        q = xiq.X86InductorQuantizer()
        q.set_global(xiq.get_default_x86_inductor_quantization_config(is_dynamic=False))
        gm = prepare_pt2e(gm, q)
        n = 0
        for batch in calibration:
            gm(**batch)
            n += 1
        if n == 0:
            raise ValueError("int8_static needs at least one calibration batch")
        qm = convert_pt2e(gm)
    _drop_unused_tensors(qm)
    pt2e.allow_exported_model_train_eval(qm)  # its patched .eval() returns None: do not chain it
    qm.eval()
    return qm


def quantize_int8_qat(model: nn.Module, example_inputs: Mapping[str, torch.Tensor],
                      batches: Iterable[Any], loss_fn: Callable[[torch.Tensor, Any], torch.Tensor], *,
                      steps: int, lr: float = 1e-4, seed: int = 0) -> nn.Module:
    """Quantization-aware int8 (PT2E, ``X86InductorQuantizer(is_qat=True)``): export the model in
    train mode (dynamic batch), insert fake-quantize observers, fine-tune ``steps`` AdamW steps on
    ``batches`` (an iterable of (inputs, targets), cycled) with ``loss_fn(outputs, targets)``, then
    convert. The result is what :func:`quantize_int8_static` returns (static scales, learnt under
    quantization noise): run it through :func:`compile_frozen`, save it with :func:`export_pt2`."""
    import itertools

    import torchao.quantization.pt2e as pt2e
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_qat_pt2e

    if steps < 1:
        raise ValueError("int8_qat needs at least one fine-tuning step")
    torch.manual_seed(seed)
    model = copy.deepcopy(model).train()
    gm = torch.export.export(model, (), dict(example_inputs), dynamic_shapes=_dynamic_batch(example_inputs)).module()
    q = xiq.X86InductorQuantizer()
    q.set_global(xiq.get_default_x86_inductor_quantization_config(is_qat=True))
    gm = prepare_qat_pt2e(gm, q)
    pt2e.move_exported_model_to_train(gm)
    opt = torch.optim.AdamW([p for p in gm.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    data = list(batches)
    if not data:
        raise ValueError("int8_qat needs at least one training batch")
    for inputs, targets in itertools.islice(itertools.cycle(data), steps):
        loss = loss_fn(gm(**inputs), targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    pt2e.move_exported_model_to_eval(gm)
    with torch.no_grad():
        qm = convert_pt2e(gm)
    _drop_unused_tensors(qm)
    pt2e.allow_exported_model_train_eval(qm)
    qm.eval()
    return qm


def _drop_unused_tensors(gm: nn.Module) -> None:
    """convert_pt2e folds int8 weights into new constants but keeps the original fp32 tensors as
    attributes: delete those no graph node reads (otherwise the artifact carries both)."""
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name, _ in list(gm.named_parameters()) + list(gm.named_buffers()):
        if name in used or any(u.startswith(name + ".") for u in used):
            continue
        mod_name, _, attr = name.rpartition(".")
        owner = gm.get_submodule(mod_name) if mod_name else gm
        owner._parameters.pop(attr, None)
        owner._buffers.pop(attr, None)


def compile_frozen(model: nn.Module, freezing: bool = True) -> FrozenCompiled:
    return FrozenCompiled(model, freezing=freezing)


def _dynamic_batch(example_inputs: Mapping[str, torch.Tensor]) -> Dict[str, Any]:
    batch = torch.export.Dim("batch", min=1, max=1024)
    return {k: {0: batch} for k in example_inputs}


def load_pt2(path: str) -> nn.Module:
    """The module of a ``.pt2`` written by :func:`export_pt2` (``torch.export.load``: trusted files only).
    An int8 (PT2E) graph holds ``quantized_decomposed`` ops, which only torchao's pt2e package
    registers: import it first, or a fresh process (a Serve replica) cannot deserialize the file."""
    import torchao.quantization.pt2e as pt2e  # registers torch.ops.quantized_decomposed.*

    gm = torch.export.load(path).module()
    pt2e.allow_exported_model_train_eval(gm)  # an exported module's .eval()/.train() raise otherwise
    return gm


def export_pt2(model: nn.Module, example_inputs: Mapping[str, torch.Tensor], path: str) -> str:
    """``torch.export`` with a dynamic batch dimension, saved as ``.pt2`` (example batch >= 2: a
    batch of 1 would specialise the dimension)."""
    inputs = {k: v[:2] if v.shape[0] >= 2 else torch.cat([v, v]) for k, v in example_inputs.items()}
    model.eval()  # (a pt2e GraphModule's patched eval() returns None)
    target = model
    if isinstance(target, CastInputs):  # export the bare low-precision model on cast inputs
        inputs = {k: (v.to(target.dtype) if v.is_floating_point() else v) for k, v in inputs.items()}
        target = target.model
    if isinstance(target, FrozenCompiled):
        target = target.inner
    if isinstance(target, CastInputs):
        inputs = {k: (v.to(target.dtype) if v.is_floating_point() else v) for k, v in inputs.items()}
        target = target.model
    with torch.no_grad():
        ep = torch.export.export(target, (), inputs, dynamic_shapes=_dynamic_batch(inputs))
    ep.example_inputs = None  # otherwise the sample batch is stored too (larger than the weights here)
    torch.export.save(ep, path)
    return path
