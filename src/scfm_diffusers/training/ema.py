"""Dual LoRA EMA of the SCFM student, kept as two extra peft adapters on the one base transformer.

Time convention (diffusers): σ ∈ [0, 1], σ = 1 is pure noise, ``x_σ = (1 − σ)·x0 + σ·ε``, velocity
``v = ε − x0``. This module does not touch time; it only decides which weights a forward pass uses.

One transformer carries three LoRA adapters with the same config: the trainable student, a fast EMA
and a slow EMA. The teacher is the same transformer with all adapters disabled, so no weights are ever
copied into or out of the live model: switching is a flag flip per LoRA layer. After each optimizer step::

    fast ← fast + (1 − fast_decay)·(θ − fast)      slow ← slow + (1 − slow_decay)·(θ − slow)

per LoRA tensor, in fp32. The EMAs start equal to the student at construction; the student's LoRA starts
with B = 0, so at step 0 both EMAs equal the teacher.

Pass the *unwrapped* transformer (``accelerator.unwrap_model(model)``); DDP wrappers are unwrapped here
too. Target passes run through the unwrapped module under ``torch.no_grad()``; the student pass may go
through the DDP wrapper, whose parameter set is unchanged because EMA tensors never require grad.

Sharded (FSDP2): ``fully_shard`` replaces every parameter by a sharded copy, so call :meth:`DualLoraEMA.refresh`
after ``accelerator.prepare``. The update then runs on each rank's rows; :meth:`~DualLoraEMA.state_dict` and
:meth:`~DualLoraEMA.adapter_state_dict` gather whole tensors (every rank must call them) and
:meth:`~DualLoraEMA.load_state_dict` takes whole tensors back into the shards
(:mod:`scfm_diffusers.training.distributed`).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Literal

import torch
from peft import get_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .distributed import copy_full_, full_tensors, reshard

__all__ = ["DualLoraEMA", "lora_parameters"]

Which = Literal["student", "teacher", "fast", "slow"]


def lora_parameters(model: nn.Module, adapter_name: str) -> dict[str, nn.Parameter]:
    """Return one adapter's LoRA parameters keyed without the adapter name.

    Keys look like ``"transformer_blocks.0.attn.to_q.lora_A.weight"`` for every adapter, so the key sets of
    two adapters with the same config are equal.
    """
    params = {}
    for module_name, module in model.named_modules():
        if not isinstance(module, BaseTunerLayer):
            continue
        for layer_name in module.adapter_layer_names:
            container = getattr(module, layer_name)
            if adapter_name not in container:
                continue
            entry = container[adapter_name]
            prefix = f"{module_name}.{layer_name}"
            if isinstance(entry, nn.Parameter):
                params[prefix] = entry
            else:
                params.update({f"{prefix}.{name}": p for name, p in entry.named_parameters()})
    return params


class DualLoraEMA:
    """Fast and slow EMAs of a LoRA student, as peft adapters on the same transformer.

    Args:
        transformer: A diffusers model with PEFT support (e.g. ``FluxTransformer2DModel``) that already
            carries the student adapter (``transformer.add_adapter(lora_config, student_adapter)``).
        student_adapter: Name of the trainable student adapter.
        fast_name: Adapter name of the fast EMA.
        slow_name: Adapter name of the slow EMA.
        fast_decay: Decay of the fast EMA (reference 0.99).
        slow_decay: Decay of the slow EMA (reference 0.999).

    After construction and after every context below, the student is the active adapter, its tensors
    require grad, and the EMA tensors (fp32) never do.
    """

    def __init__(
        self,
        transformer: nn.Module,
        student_adapter: str = "default",
        fast_name: str = "ema_fast",
        slow_name: str = "ema_slow",
        fast_decay: float = 0.99,
        slow_decay: float = 0.999,
    ) -> None:
        while isinstance(transformer, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            transformer = transformer.module
        if len({student_adapter, fast_name, slow_name}) != 3:
            raise ValueError(f"Adapter names must differ, got {student_adapter!r}, {fast_name!r}, {slow_name!r}.")
        for name, decay in (("fast_decay", fast_decay), ("slow_decay", slow_decay)):
            if not 0.0 <= decay <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {decay}.")
        peft_config = getattr(transformer, "peft_config", {})
        if student_adapter not in peft_config:
            raise ValueError(
                f"The transformer has no adapter {student_adapter!r} (adapters: {list(peft_config)}); add the "
                "student LoRA with transformer.add_adapter(...) before building the EMA."
            )
        for name in (fast_name, slow_name):
            if name in peft_config:
                raise ValueError(f"The transformer already has an adapter named {name!r}.")

        self.transformer = transformer
        self.student_adapter, self.fast_name, self.slow_name = student_adapter, fast_name, slow_name
        self.fast_decay, self.slow_decay = fast_decay, slow_decay
        for name in (fast_name, slow_name):
            with warnings.catch_warnings():  # several adapters on one model is the point here
                warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
                transformer.add_adapter(copy.deepcopy(peft_config[student_adapter]), adapter_name=name)
        self.refresh()
        for ema in self._emas.values():
            for p in ema.values():
                p.data = p.data.float()
        self._activate_student()  # add_adapter made the last EMA active and trainable
        self.restart()

    def refresh(self) -> None:
        """Find the LoRA tensors again after a wrapper replaced the parameters (FSDP2's ``fully_shard`` puts a
        sharded copy of each in its place; the update must then lerp those, not the originals)."""
        reshard(self.transformer)  # the modules hold the sharded parameters, not gathered copies
        self._layers = [m for m in self.transformer.modules() if isinstance(m, BaseTunerLayer)]
        self._student = lora_parameters(self.transformer, self.student_adapter)
        self._emas = {
            "fast": lora_parameters(self.transformer, self.fast_name),
            "slow": lora_parameters(self.transformer, self.slow_name),
        }
        for ema in self._emas.values():
            # Same config ⇒ same keys; checked once so that update() can zip plain lists.
            assert ema.keys() == self._student.keys(), "EMA and student LoRA tensors differ"

    def parameters(self, which: Literal["student", "fast", "slow"]) -> dict[str, nn.Parameter]:
        """One adapter's LoRA parameters (as :func:`lora_parameters`; sharded ones under FSDP2)."""
        self._names(which)  # validates ``which``
        return self._student if which == "student" else self._emas[which]

    def _names(self, which: Which) -> str:
        names = {"student": self.student_adapter, "fast": self.fast_name, "slow": self.slow_name}
        if which not in names:
            raise ValueError(f"Expected one of {sorted(names)}, got {which!r}.")
        return names[which]

    def _activate_student(self) -> None:
        for layer in self._layers:
            layer.set_adapter(self.student_adapter)  # student trainable, every other adapter frozen
            layer.enable_adapters(True)

    @torch.no_grad()
    def update(self) -> None:
        """One EMA step for both EMAs: ``ema ← lerp(ema, θ, 1 − decay)`` per LoRA tensor, in fp32."""
        student = [p.detach().float() for p in self._student.values()]
        for which, decay in (("fast", self.fast_decay), ("slow", self.slow_decay)):
            torch._foreach_lerp_(list(self._emas[which].values()), student, 1.0 - decay)

    @torch.no_grad()
    def restart(self) -> None:
        """Reset both EMAs to the current student (``ema_restart_steps``)."""
        for ema in self._emas.values():
            for key, p in ema.items():
                p.copy_(self._student[key])

    @contextmanager
    def use(self, which: Which) -> Iterator[nn.Module]:
        """Run the transformer as ``which`` inside the block; the student is restored on exit, even on errors.

        ``"teacher"`` disables every adapter (exactly the base model); ``"fast"``/``"slow"`` activate that
        EMA; ``"student"`` changes nothing. No tensors are copied; requires_grad flags are left as they are
        outside the block (student True, EMAs False). Not reentrant: do not nest.

        Yields:
            The (unwrapped) transformer.
        """
        name = None if which == "teacher" else self._names(which)  # validates ``which``
        if which == "student":
            yield self.transformer
            return
        try:
            for layer in self._layers:
                if which == "teacher":
                    layer.enable_adapters(False)
                else:
                    layer.set_adapter(name, inference_mode=True)
                layer.set_requires_grad(self.student_adapter, True)  # both calls above froze it
            yield self.transformer
        finally:
            self._activate_student()

    def wrap(self, which: Which, velocity: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        """``velocity`` run inside :meth:`use` ``(which)`` on every call: a target callable for the objective.

        Example:
            ``scfm_loss(teacher=ema.wrap("teacher", v), fast_ema=ema.wrap("fast", v), slow_ema=ema.wrap("slow", v), ...)``
        """
        if which != "teacher":
            self._names(which)  # fail at wrap time, not inside the training step

        def wrapped(*args, **kwargs):
            with self.use(which):
                return velocity(*args, **kwargs)

        return wrapped

    def teacher(self) -> AbstractContextManager[nn.Module]:
        """Context: the base model, all adapters disabled. See :meth:`use`."""
        return self.use("teacher")

    def fast(self) -> AbstractContextManager[nn.Module]:
        """Context: the fast EMA adapter. See :meth:`use`."""
        return self.use("fast")

    def slow(self) -> AbstractContextManager[nn.Module]:
        """Context: the slow EMA adapter. See :meth:`use`."""
        return self.use("slow")

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Both EMAs' whole LoRA tensors on the CPU, keyed ``"fast.<lora key>"`` and ``"slow.<lora key>"`` (sharded
        ones gathered: call it on every rank)."""
        return full_tensors({f"{which}.{key}": p for which, ema in self._emas.items() for key, p in ema.items()})

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load whole tensors saved by :meth:`state_dict` (into each rank's rows when sharded); keys and shapes must
        match exactly."""
        params = {f"{which}.{key}": p for which, ema in self._emas.items() for key, p in ema.items()}
        missing, unexpected = sorted(params.keys() - state_dict.keys()), sorted(state_dict.keys() - params.keys())
        if missing or unexpected:
            raise KeyError(
                f"EMA state dict does not match the LoRA config: {len(missing)} missing keys "
                f"(e.g. {missing[:3]}), {len(unexpected)} unexpected keys (e.g. {unexpected[:3]})."
            )
        for key, p in params.items():
            if state_dict[key].shape != p.shape:
                raise ValueError(
                    f"Shape mismatch for {key!r}: checkpoint {tuple(state_dict[key].shape)}, model {tuple(p.shape)}."
                )
        for key, p in params.items():
            copy_full_(p, state_dict[key])

    def adapter_state_dict(self, which: Literal["student", "fast", "slow"]) -> dict[str, torch.Tensor]:
        """peft-format LoRA state dict of one adapter with whole CPU tensors, e.g. for
        ``FluxPipeline.save_lora_weights`` (sharded ones gathered: call it on every rank)."""
        reshard(self.transformer)  # the modules then hold the sharded parameters on every rank alike
        return full_tensors(get_peft_model_state_dict(self.transformer, adapter_name=self._names(which)))
