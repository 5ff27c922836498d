"""The training step as the recipe's ``compile`` option runs it: sample a batch, update.

* ``none``: plain PyTorch, stage by stage (the reference the other modes are tested against).
* ``default``: every stage of the agent's ``run_update`` goes through ``torch.compile``
  (fused element-wise work, e.g. the behaviour model's Mish layers); backward passes and
  optimiser steps stay eager. CPU or CUDA. The first steps pay the compilation (tens of
  seconds on a CPU).
* ``graph`` (CUDA only): the whole step, batch sampling included, is captured as a CUDA graph
  per kind of update (the agent's ``update_kind()``: a critic-only step or one with the actor
  update; for Diffusion-QL, a step with or without the EMA refresh), each recorded the first
  time it is needed, and replayed: no Python, no host work and no host sync per step. The
  optimisers become capturable; the first ``warmup`` steps run outside the graph (they are
  ordinary training steps). With ``graph_stages="compiled"`` (the default) the stages go
  through ``torch.compile`` first, so the graph replays inductor's fused kernels: far fewer
  kernels per step than the eager ones, which is what bounds a small network's step on a GPU. A
  stage that fails to compile, or a capture of compiled stages that fails, falls back to the
  eager kernels with a warning. Stacked seeds compile their vmapped stages the same way.

Batches come from a :class:`DeviceSampler` when training on a dataset: the transitions stay on
the training device and indices are drawn there, so nothing crosses the host per step.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable, Hashable

import torch
from tensordict import TensorDictBase

from divo.errors import ConfigError, first_line

COMPILE_MODES = ("none", "default", "graph")
GRAPH_STAGES = ("compiled", "eager")  # what compile=graph captures

_log = logging.getLogger("divo.train")


class DeviceSampler:
    """Uniform minibatches with replacement, drawn where the data live.

    ``sample()`` -> a TED TensorDict of ``batch_size`` transitions (``[num_seeds, batch_size]``
    when ``num_seeds`` is set: an independent draw per seed). Indices come from ``torch.randint``
    on the data's device with ``generator`` (default: that device's global generator, whose
    state the training checkpoints save), so a CUDA graph can capture the sampling.
    """

    def __init__(
        self,
        data: TensorDictBase,
        batch_size: int,
        num_seeds: int | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        if data.batch_dims != 1 or data.batch_size[0] == 0:
            raise ValueError(f"DeviceSampler needs a non-empty 1-d TensorDict, got {data.shape}")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.data = data
        self.batch_size = int(batch_size)
        self.num_seeds = num_seeds
        self.generator = generator
        self._shape = (batch_size,) if num_seeds is None else (num_seeds, batch_size)

    def __len__(self) -> int:
        return self.data.batch_size[0]

    def sample(self) -> TensorDictBase:
        index = torch.randint(
            len(self), self._shape, device=self.data.device, generator=self.generator
        )
        return self.data[index]


def compile_options(cfg) -> dict[str, str]:
    """The recipe's ``compile`` and ``graph_stages`` as keyword arguments of
    :func:`check_compile_mode` and :class:`TrainStep`."""
    return {"mode": cfg.get("compile", "none"), "graph_stages": cfg.get("graph_stages", "compiled")}


def check_compile_mode(mode: str, device: torch.device, graph_stages: str = "compiled") -> None:
    if mode not in COMPILE_MODES:
        raise ConfigError(
            f"compile={mode!r} is not a mode; choose one of {', '.join(COMPILE_MODES)}"
        )
    if graph_stages not in GRAPH_STAGES:
        raise ConfigError(
            f"graph_stages={graph_stages!r} is not an option; choose one of "
            f"{', '.join(GRAPH_STAGES)}"
        )
    if mode == "graph" and device.type != "cuda":
        raise ConfigError(
            f"compile=graph captures CUDA graphs but the device is {device}; use compile=default "
            "(torch.compile) or compile=none on a CPU"
        )


def optimizer_options(mode: str, device: torch.device) -> dict:
    """Adam keyword arguments the compile mode needs on ``device`` (user settings win)."""
    if device.type != "cuda":
        return {}
    # one fused kernel per parameter group; capturable keeps the step count on the device
    return {"fused": True, "capturable": mode == "graph"}


class TrainStep:
    """``step()`` -> the metrics of one training step (detached tensors on the device).

    Args:
        agent: an agent with ``update(batch)`` and ``num_updates``; ``default`` also needs
            ``make_stages`` and ``run_update``, ``graph`` ``update_kind`` (every
            :class:`TrainableAgent` and stacked seeds' :class:`VectorizedAgent` have them).
        sample: returns the next batch (a :class:`DeviceSampler`'s ``sample`` or a TorchRL
            replay buffer's).
        mode: one of :data:`COMPILE_MODES`.
        warmup: steps before capturing the CUDA graphs (``graph`` only; at least one actor
            update happens in them so every optimiser state exists, and every stage is
            compiled, before capture).
        graph_stages: ``graph`` only: ``compiled`` (stages through ``torch.compile``, then
            captured) or ``eager`` (the eager kernels captured).
    """

    def __init__(
        self,
        agent,
        sample: Callable[[], TensorDictBase],
        mode: str = "none",
        device: torch.device | str = "cpu",
        warmup: int = 4,
        graph_stages: str = "compiled",
    ) -> None:
        device = torch.device(device)
        check_compile_mode(mode, device, graph_stages)
        self.agent = agent
        self.sample = sample
        self.mode = mode
        self.device = device
        self._stages = None
        self._compiled = False
        if mode == "default":
            if not hasattr(agent, "make_stages"):
                raise ConfigError(
                    f"compile=default needs an agent built from stages (make_stages, "
                    f"run_update); {type(agent).__name__} runs with compile=none or graph"
                )
            self._stages = agent.make_stages(wrap=_compile)
        if mode == "graph":  # any agent whose update is free of host work (stacked seeds too)
            model = getattr(agent, "behavior_model", None)
            if model is not None and hasattr(model, "set_training_step"):
                raise ConfigError(
                    f"compile=graph cannot capture {type(model).__name__}: its schedule changes "
                    "with the step on the host; use compile=default or none"
                )
            schedules = getattr(getattr(agent, "agent", agent), "lr_schedules", {})
            if schedules:
                raise ConfigError(
                    f"compile=graph cannot capture a learning-rate schedule ({', '.join(schedules)}"
                    "): a graph replays the rate it recorded; use compile=default or none"
                )
            if not hasattr(agent, "update_kind"):
                raise ConfigError(
                    f"compile=graph needs the agent's update_kind() (which host-side branch the "
                    f"next update takes); {type(agent).__name__} has none: use compile=none"
                )
            if graph_stages == "compiled" and hasattr(agent, "make_stages"):
                self._stages = agent.make_stages(wrap=_compile, on_wrap_error=_eager_instead)
            delay = int(getattr(agent, "policy_delay", 1))
            self.warmup = max(int(warmup), 2 * delay)
            self._graphs: dict[Hashable, torch.cuda.CUDAGraph] = {}
            self._outputs: dict[Hashable, dict[str, torch.Tensor]] = {}

    @property
    def compiled_stages(self) -> list[str]:
        """The stages that have run compiled so far (none under ``compile=none``, or after
        ``graph`` fell back to the eager kernels); see also :attr:`uncompiled_stages`."""
        return sorted(self._stages.calls.compiled) if self._stages is not None else []

    @property
    def uncompiled_stages(self) -> list[str]:
        """The stages that failed to compile and run eagerly (``graph`` only)."""
        return sorted(self._stages.calls.unwrapped) if self._stages is not None else []

    def __call__(self) -> dict[str, torch.Tensor]:
        if self.mode == "none":
            return self.agent.update(self.sample())
        if self.mode == "default":
            if self._compiled:
                return self.agent.run_update(self.sample(), self._stages)
            return self._first_compiled_step()
        return self._graph_step()

    def _first_compiled_step(self) -> dict[str, torch.Tensor]:
        _log.info("compile=default: compiling the update stages (a minute or so on a CPU)")
        start = time.perf_counter()
        out = self.agent.run_update(self.sample(), self._stages)
        self._compiled = True
        _log.info(
            "first step compiled and run in %.1f s (a stage first used later, e.g. the delayed "
            "actor, compiles then)",
            time.perf_counter() - start,
        )
        return out

    # ------------------------------------------------------------------ CUDA graphs
    def _eager(self) -> dict[str, torch.Tensor]:
        """One update as the graphs record it: compiled stages, or the eager update."""
        if self._stages is not None:
            return self.agent.run_update(self.sample(), self._stages)
        return self.agent.update(self.sample())

    def _graph_step(self) -> dict[str, torch.Tensor]:
        if self.warmup > 0:
            self.warmup -= 1
            return self._warmup_step()
        agent = self.agent
        kind = agent.update_kind()
        if kind not in self._graphs:
            self._capture(kind)
        self._graphs[kind].replay()
        agent.num_updates += 1
        return self._outputs[kind]

    def _capture(self, kind) -> None:
        """Record the next update (of kind ``kind``) as a CUDA graph; a capture runs nothing,
        so the Python step counter is put back afterwards."""
        _log.info("compile=graph: capturing the training step (kind %r) as a CUDA graph", kind)
        done = self.agent.num_updates
        try:
            self._graphs[kind], self._outputs[kind] = self._record(self._eager)
        except RuntimeError as exc:
            if self._stages is None:
                raise ConfigError(
                    f"compile=graph could not capture the training step ({exc}); a part of the "
                    "recipe syncs with the host. Use compile=default or none"
                ) from exc
            _log.warning(
                "compile=graph: capturing the compiled stages failed (%s); capturing the eager "
                "kernels instead (graph_stages=eager)",
                first_line(exc),
            )
            self._stages = None
            self.agent.num_updates = done
            self._capture(kind)
        finally:
            self.agent.num_updates = done

    # The CUDA calls, one method each (tests replace them to check the logic above on a CPU).
    def _warmup_step(self) -> dict[str, torch.Tensor]:
        """An eager step on a side stream, as CUDA graph capture asks of the steps before it."""
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            out = self._eager()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        return out

    def _record(self, step: Callable[[], dict]) -> tuple[torch.cuda.CUDAGraph, dict]:
        """Capture ``step()`` (its kernels are recorded, not run) and its static outputs."""
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = step()
        torch.cuda.synchronize(self.device)
        return graph, outputs


def _compile(fn: Callable) -> Callable:
    # tensordict (to_module, under stacked seeds) reads a dynamo flag that torch deprecated:
    # its FutureWarning says nothing to a user of divo
    warnings.filterwarnings(
        "ignore", message=".*inline_inbuilt_nn_modules is deprecated", category=FutureWarning
    )
    return torch.compile(fn, dynamic=False)


def _eager_instead(stage: str, exc: Exception) -> None:
    _log.warning(
        "compile=graph: stage %s could not be compiled (%s); its eager kernels are captured",
        stage,
        first_line(exc),
    )
