"""The training engine shared by every study.

A study supplies a `Task` (its model, how to draw a training batch for a step, its loss,
and its evaluation); the engine owns the rest: the step loop, Adam, logging to
metrics.csv and TensorBoard, checkpoints and resume, Ctrl-C, NaN checks, progress and the
CUDA-graph fast path.

Speed rules: the data lives on the device as one tensor and a batch is drawn by index;
nothing in the inner loop waits for the device except at log, eval and checkpoint steps;
on CUDA the whole step (gather, forward, backward, Adam) is replayed as one CUDA graph.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from contextlib import nullcontext
from typing import Protocol

import torch
from torch import nn

from cifarlab import CifarlabError
from cifarlab.config import Config
from cifarlab.runs import RunDir


class Task(Protocol):
    """What a study gives the engine."""

    model: nn.Module

    def train_inputs(self, step: int) -> tuple[torch.Tensor, ...]:
        """Device tensors that select step `step`'s batch; a pure function of the step."""

    def train_loss(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(mean loss, number correct, batch examples) for one batch; runs inside the graph."""

    def evaluate(self) -> dict[str, tuple[float, float]]:
        """{split: (loss, accuracy)} on the evaluation splits, model in eval mode."""


class TrainingDiverged(CifarlabError):
    pass


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise CifarlabError("--device cuda asked for, but torch sees no CUDA GPU; use --device cpu")
    device = torch.device(name)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels
        torch.set_float32_matmul_precision("high")  # TF32 matmuls on Ampere and later
    return device


def make_autocast(precision: str, device: torch.device):
    """A context factory for the step and evaluation: bf16 autocast, or nothing for fp32.

    The autocast cache is off because a CUDA graph must not keep casts from capture time.
    """
    if precision == "bf16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False)
    return nullcontext


class StepRunner:
    """Runs one training step, eagerly or as a captured CUDA graph.

    The running sums of loss and correct predictions stay on the device so that the loop
    never synchronises between log points.
    """

    def __init__(self, task: Task, optimizer: torch.optim.Optimizer, autocast, use_graph: bool):
        self.task, self.optimizer, self.autocast = task, optimizer, autocast
        device = next(task.model.parameters()).device
        self.loss_sum = torch.zeros((), device=device)
        self.correct_sum = torch.zeros((), device=device)
        self.examples = 0
        self.steps = 0
        self.use_graph = use_graph
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_inputs: tuple[torch.Tensor, ...] = ()

    def _step(self, inputs: tuple[torch.Tensor, ...]) -> int:
        self.optimizer.zero_grad(set_to_none=not self.use_graph)
        with self.autocast():
            loss, correct, n = self.task.train_loss(*inputs)
        loss.backward()
        self.optimizer.step()
        self.loss_sum += loss.detach().float()
        self.correct_sum += correct
        return n

    def run(self, step: int) -> None:
        inputs = self.task.train_inputs(step)
        if not self.use_graph:
            n = self._step(inputs)
        else:
            if self.graph is None:
                self._capture(inputs)
            for static, new in zip(self.static_inputs, inputs):
                static.copy_(new, non_blocking=True)
            self.graph.replay()
            n = self._graph_examples
        self.examples += n
        self.steps += 1

    def _capture(self, inputs: tuple[torch.Tensor, ...]) -> None:
        """Capture the step; warm-up steps are undone so the result equals the eager path."""
        opt = self.optimizer
        params = [p for group in opt.param_groups for p in group["params"]]
        saved_params = [p.detach().clone() for p in params]
        saved_state = {id(t): t.clone() for st in opt.state.values() for t in st.values()
                       if torch.is_tensor(t)}
        sums = (self.loss_sum.clone(), self.correct_sum.clone())
        self.static_inputs = tuple(t.clone() for t in inputs)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                self._step(self.static_inputs)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.cuda.graph(self.graph):
            self._graph_examples = self._step(self.static_inputs)
        with torch.no_grad():
            for p, saved in zip(params, saved_params):
                p.copy_(saved)
            for st in opt.state.values():
                for t in st.values():
                    if torch.is_tensor(t):
                        t.copy_(saved_state[id(t)]) if id(t) in saved_state else t.zero_()
            self.loss_sum.copy_(sums[0])
            self.correct_sum.copy_(sums[1])

    def take_means(self) -> tuple[float, float]:
        """Mean loss and accuracy since the last call (one device sync); resets the sums."""
        loss = self.loss_sum.item() / max(self.steps, 1)
        acc = self.correct_sum.item() / max(self.examples, 1)
        self.loss_sum.zero_()
        self.correct_sum.zero_()
        self.examples = self.steps = 0
        return loss, acc

    def state_dict(self) -> dict:
        return {"loss_sum": self.loss_sum.detach().cpu(), "correct_sum": self.correct_sum.detach().cpu(),
                "examples": self.examples, "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.loss_sum.copy_(state["loss_sum"])
        self.correct_sum.copy_(state["correct_sum"])
        self.examples, self.steps = int(state["examples"]), int(state["steps"])


class _InterruptFlag:
    """First Ctrl-C asks the loop to stop at the next step boundary; a second one aborts."""

    def __init__(self):
        self.set = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.set:
            raise KeyboardInterrupt
        self.set = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


class Trainer:
    """Step-based training of one task into one run directory."""

    def __init__(self, cfg: Config, task: Task, run: RunDir, device: torch.device, progress: bool = True):
        self.cfg, self.task, self.run, self.device, self.progress = cfg, task, run, device, progress
        self.model = task.model
        self.optimizer = torch.optim.Adam(
            [p for p in self.model.parameters() if p.requires_grad], lr=cfg.lr,
            capturable=self._use_graph(), foreach=True,
        )
        self.autocast = make_autocast(cfg.precision, device)
        self.runner = StepRunner(task, self.optimizer, self.autocast, self._use_graph())
        self.step = 0
        self.writer = None
        # cumulative over resumes: all time in fit(), and the part spent evaluating/logging
        self.clock = {"wall": 0.0, "eval": 0.0}
        self._started = time.perf_counter()

    def _sync_phase(self) -> None:
        """Let the task start training more parameters at this step (the transfer study's
        refine-after-K): they join Adam as a new group and the CUDA graph is captured anew."""
        more = self.task.parameters_to_unfreeze(self.step) if hasattr(self.task, "parameters_to_unfreeze") else None
        if more:
            self.optimizer.add_param_group({"params": more})
            self.runner.graph = None

    def _use_graph(self) -> bool:
        return self.cfg.cuda_graph and self.device.type == "cuda"

    # -- checkpoints -------------------------------------------------------------------------
    def _training_state(self) -> dict:
        state = {
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "accumulators": self.runner.state_dict(),
            "rng_cpu": torch.get_rng_state(),
            "clock": {"wall": self._wall(), "eval": self.clock["eval"]},
        }
        if self.device.type == "cuda":
            state["rng_cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def save_checkpoint(self, weights_too: bool = True) -> None:
        if not all(torch.isfinite(p).all() for p in self.model.parameters()):
            raise TrainingDiverged(
                f"weights are not finite at step {self.step}; not saving. "
                f"{self.run.last_good_hint()}"
            )
        if weights_too:
            self.run.save_weights(self.step, self.model)
        self.run.save_training_state(self._training_state())

    def resume(self) -> None:
        state = self.run.load_training_state(self.device)
        self.model.load_state_dict(state["model"])
        self.step = int(state["step"])
        self._sync_phase()  # the optimizer must have the groups it had when saved
        self.optimizer.load_state_dict(state["optimizer"])
        self.runner.load_state_dict(state["accumulators"])
        torch.set_rng_state(state["rng_cpu"])
        if "rng_cuda" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng_cuda"], self.device)
        self.clock = {k: float(v) for k, v in state["clock"].items()}
        self.run.truncate_metrics(self.step)

    # -- logging -----------------------------------------------------------------------------
    def _tb(self):
        if self.writer is None and self.cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.run.path / "tb"), purge_step=self.step + 1)
        return self.writer

    def _wall(self) -> float:
        return self.clock["wall"] + time.perf_counter() - self._started

    def _log(self) -> dict[str, tuple[float, float]]:
        train = self.runner.take_means()
        eval_start = time.perf_counter()
        elapsed = self._wall()
        if not math.isfinite(train[0]):
            raise TrainingDiverged(
                f"training loss became {train[0]} before step {self.step}; "
                f"{self.run.last_good_hint()} Try a lower --lr."
            )
        results = {"train": train, **self.task.evaluate()}
        for split, (loss, acc) in results.items():
            self.run.add_metric(self.step, split, loss, acc, elapsed)
            writer = self._tb()
            if writer is not None:
                writer.add_scalar(f"{split}/loss", loss, self.step)
                writer.add_scalar(f"{split}/accuracy", acc, self.step)
        writer = self._tb()
        if writer is not None:
            for name, p in self.model.named_parameters():
                writer.add_histogram(name, p.detach().float().cpu(), self.step)
            writer.flush()
        self.run.write_metrics()
        self.clock["eval"] += time.perf_counter() - eval_start
        return results

    # -- the loop ----------------------------------------------------------------------------
    def fit(self) -> dict:
        cfg = self.cfg
        self.model.train()
        self._started = time.perf_counter()
        bar = _progress(cfg.steps, self.step, self.progress, self.run.name)
        last = {}
        tick_at = time.perf_counter()
        try:
            with _InterruptFlag() as interrupt:
                while self.step < cfg.steps:
                    self._sync_phase()
                    self.runner.run(self.step)
                    self.step += 1
                    log_now = self.step % cfg.eval_every == 0 or self.step == cfg.steps
                    ckpt_now = self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps
                    if log_now:
                        self.model.eval()
                        last = self._log()
                        self.model.train()
                        if bar is not None:
                            bar.set_postfix(_postfix(last), refresh=False)
                    if ckpt_now:
                        self.save_checkpoint()
                    if bar is not None and (log_now or time.perf_counter() - tick_at > 0.5):
                        bar.update(self.step - bar.n)
                        tick_at = time.perf_counter()
                    if interrupt.set and self.step < cfg.steps:
                        self.save_checkpoint(weights_too=False)
                        raise CifarlabError(
                            f"interrupted at step {self.step}; progress saved. "
                            f"Continue with: cifarlab train {cfg.study} --resume {self.run.path}"
                        )
        finally:
            if bar is not None:
                bar.close()
            if self.writer is not None:
                self.writer.close()
        wall = self._wall()
        extra = self.task.summary() if hasattr(self.task, "summary") else None
        return self.run.write_summary(self.cfg, wall, wall - self.clock["eval"], self.device, extra)


def _postfix(results: dict[str, tuple[float, float]]) -> dict[str, str]:
    out = {"loss": f"{results['train'][0]:.3f}"}
    for split, (_, acc) in results.items():
        if split != "train":
            out[f"{split}_acc"] = f"{acc:.4f}"
    return out


def _progress(total: int, initial: int, enabled: bool, name: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=name, unit="step", dynamic_ncols=True)
