"""The training engine shared by every study.

A study supplies a `Task` (its model, how to draw a training batch for a step, its loss,
and its evaluation); the engine owns the rest: the step loop, Adam, logging to
metrics.csv and TensorBoard, checkpoints and resume, Ctrl-C, NaN checks, progress, the
CUDA-graph fast path and data-parallel training over torchrun's processes (distributed.py).

Speed rules: the data lives on the device as one tensor and a batch is drawn by index;
nothing in the inner loop waits for the device except at log, eval and checkpoint steps;
on CUDA the whole step (gather, forward, backward, Adam) is replayed as one CUDA graph; on a
CPU freed activation memory is kept for the next step rather than handed back to the OS.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import shlex
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from cifarlab import CifarlabError, counted, interrupts
from cifarlab.config import Config, is_device_name
from cifarlab.distributed import Solo
from cifarlab.runs import RunDir, load_state


class Task(Protocol):
    """What a study gives the engine."""

    model: nn.Module

    def train_inputs(self, step: int) -> tuple[torch.Tensor, ...]:
        """Device tensors that select step `step`'s batch; a pure function of the step. Row i of
        each is example i: under --distributed every rank draws them all and keeps its rows."""

    def train_loss(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(mean loss, number correct, batch examples) for one batch; runs inside the graph.
        A mean over the examples (plus terms of the weights alone), so ranks' losses average."""

    def evaluate(self) -> dict[str, tuple[float, float]]:
        """{split: (loss, accuracy)} on the evaluation splits, model in eval mode."""


class TrainingDiverged(CifarlabError):
    pass


class TrainingInterrupted(CifarlabError):
    """Ctrl-C: progress was saved; the run can be resumed."""


def check_device(name: str) -> None:
    """That `name` is auto, cpu, cuda or cuda:N, and that a CUDA device asked for exists."""
    if not is_device_name(name):
        raise CifarlabError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise CifarlabError("--device cuda asked for, but torch sees no CUDA GPU; use --device cpu")
    if name.startswith("cuda:") and int(name[5:]) >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise CifarlabError(f"--device {name}: torch sees {counted(count, 'GPU')} "
                            f"({'cuda:0' if count == 1 else f'cuda:0 to cuda:{count - 1}'})")


def resolve_device(name: str) -> torch.device:
    """auto, cpu, cuda or cuda:N as a torch device (with this process's speed settings for it)."""
    check_device(name)
    if name == "auto":  # then the same settings as the device named
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if device.index is not None:
            # graph capture and new streams use the current device, not the tensors'
            torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels
        torch.set_float32_matmul_precision("high")  # TF32 matmuls on Ampere and later
    elif os.environ.get("CIFARLAB_KEEP_FREED_MEMORY", "1") != "0":
        keep_freed_memory()
    return device


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def keep_freed_memory() -> bool:
    """Let glibc keep freed memory in the process heap for the next allocation (process-wide).

    A CPU step frees and allocates the same large buffers every step (conv1's output is 32 MiB
    at batch 128). By default glibc maps each such buffer fresh from the OS and unmaps it when
    freed, so every step pays page faults and the kernel zeroing new pages: about a quarter of a
    2-core step (benchmarks/profile_step.py). Turning off mmap for large blocks and trimming
    keeps them in the heap instead; the process holds on to its peak memory. Returns whether it
    applied (glibc only; elsewhere nothing changes). CIFARLAB_KEEP_FREED_MEMORY=0 turns it off
    in `resolve_device`."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library the process already runs on
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


def rng_state(device: torch.device) -> dict:
    """The CPU generator's state, and the device's when it is a GPU (dropout draws from it)."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    """Back to `rng_state`'s result. RNG states must be CPU byte tensors; last.pt is loaded onto
    the training device."""
    torch.set_rng_state(state["cpu"].cpu())
    if state.get("cuda") is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


def make_autocast(precision: str, device: torch.device):
    """A context factory for the step and evaluation: bf16 autocast, or nothing for fp32.

    The autocast cache is off because a CUDA graph must not keep casts from capture time.
    """
    if precision == "bf16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False)
    return contextlib.nullcontext


def make_adam(params, lr: float, device: torch.device, capturable: bool) -> torch.optim.Adam:
    """The engine's Adam. On a GPU its fused form: the whole update in one multi-tensor kernel
    (and one to count the step), step counts on the device so that a CUDA graph can hold it; the
    capturable foreach form runs seventeen multi-tensor operations (torch 2.13). On a CPU the
    foreach form."""
    fused = device.type == "cuda"
    return torch.optim.Adam(params, lr=lr, capturable=capturable, foreach=None if fused else True,
                            fused=True if fused else None)


# What torch's sync debug mode "error" raises for a host sync (c10/cuda/CUDAFunctions.cpp)
_SYNC_ERROR = "called a synchronizing CUDA operation"


class StepRunner:
    """Runs one training step, eagerly or as a captured CUDA graph.

    The running sums of loss and correct predictions stay on the device so that the loop
    never synchronises between log points. Under --distributed each rank trains on its slice of
    the step's batch through DDP and holds its share of the sums (losses pre-divided by the
    number of ranks), so summing over ranks at a log point gives the global means.
    """

    def __init__(self, task: Task, optimizer: torch.optim.Optimizer, autocast, use_graph: bool,
                 group: Solo | None = None, compile_loss: bool = False):
        """`compile_loss`: run the task's loss (forward, and backward through AOTAutograd) as
        torch.compile'd code; inside the CUDA graph when there is one."""
        self.task, self.optimizer, self.autocast = task, optimizer, autocast
        self.device = device = next(task.model.parameters()).device
        self.group = group or Solo(device)
        self.compile_loss = compile_loss
        self.compile_pending = compile_loss  # the next step compiles (the first, and after a new phase)
        self.forward = None
        self.wrap_anew()
        self.loss_sum = torch.zeros((), device=device)
        self.correct_sum = torch.zeros((), device=device)
        self.examples = 0
        self.steps = 0
        self.use_graph = use_graph
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_inputs: tuple[torch.Tensor, ...] = ()
        self.graph_failure: str | None = None  # why the step runs eagerly although a graph was asked for

    def wrap_anew(self) -> None:
        """The step's loss: task.train_loss, through DDP under --distributed, compiled if asked.
        DDP fixes its parameters when built, so this runs again when more parameters train."""
        self.forward = None  # drop the old DDP wrapper before the new one registers its hooks
        forward = self.group.wrap(self.task)
        self.forward = torch.compile(forward) if self.compile_loss else forward
        self.compile_pending = self.compile_loss

    def _step(self, inputs: tuple[torch.Tensor, ...]) -> int:
        if not self.compile_loss:
            return self._eager_step(inputs)
        from torch._dynamo.exc import TorchDynamoException  # dynamo's, AOTAutograd's and inductor's errors

        try:  # other errors (out of memory, a task's own) are not torch.compile's: they pass unchanged
            n = self._eager_step(inputs)
        except TorchDynamoException as err:
            raise CifarlabError(f"torch.compile could not compile the training step ({_first_cause(err)}); "
                                "train without --compile (reproduce: --set compile=false)") from err
        self.compile_pending = False
        return n

    def _eager_step(self, inputs: tuple[torch.Tensor, ...]) -> int:
        self.optimizer.zero_grad(set_to_none=not self.use_graph)
        with self.autocast():
            loss, correct, n = self.forward(*inputs)
        loss.backward()
        self.optimizer.step()
        loss = loss.detach().float()
        self.loss_sum += loss / self.group.world_size if self.group.world_size > 1 else loss
        self.correct_sum += correct
        return n

    def run(self, step: int) -> None:
        inputs = self.group.shard(self.task.train_inputs(step))
        if self.use_graph and self.graph is None:
            self._capture_or_fall_back(inputs)
        if not self.use_graph:
            n = self._step(inputs)
        else:
            for static, new in zip(self.static_inputs, inputs):
                static.copy_(new, non_blocking=True)
            self.graph.replay()
            n = self._graph_examples
        self.examples += n
        self.steps += 1

    def _capture_or_fall_back(self, inputs: tuple[torch.Tensor, ...]) -> None:
        """Capture the step as a CUDA graph after warm-up steps, then undo what those did (weights,
        Adam's state, running sums), so that replays go on from the state the run was in.

        A graph cannot hold a host sync (a task that reads a value back, say). The warm-up makes
        syncs errors, so such a task is caught before any capture starts: the run trains eagerly
        from the same state, its RNG included, and says why once. A capture that fails after a
        clean warm-up leaves CUDA in a state not to be trusted, so it stops the run with its cause.
        """
        opt = self.optimizer
        params = [p for group in opt.param_groups for p in group["params"]]
        saved_params = [p.detach().clone() for p in params]
        saved_state = {id(t): t.clone() for st in opt.state.values() for t in st.values() if torch.is_tensor(t)}
        sums = (self.loss_sum.clone(), self.correct_sum.clone())
        self.static_inputs = tuple(t.clone() for t in inputs)
        rng = rng_state(self.device)
        try:
            self._warm_up()
            failure = None
        except RuntimeError as err:
            if _SYNC_ERROR not in str(err):  # out of memory, a kernel's own refusal, ...: not a capture problem
                raise
            failure = _first_cause(err)
        if failure is None:
            try:
                self._capture_graph()
            except Exception as err:
                raise CifarlabError(f"the training step could not be captured as a CUDA graph ({_first_cause(err)}); "
                                    "train with --no-cuda-graph (reproduce: --set cuda_graph=false)") from err
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        with torch.no_grad():
            for p, saved in zip(params, saved_params):
                p.copy_(saved)
            for st in opt.state.values():
                for t in st.values():
                    if torch.is_tensor(t):
                        t.copy_(saved_state[id(t)]) if id(t) in saved_state else t.zero_()
            self.loss_sum.copy_(sums[0])
            self.correct_sum.copy_(sums[1])
        # The warm-up steps' dropout draws are undone too: a replay reads the generator's offset
        # anew each time, so the run draws from where it was (a resumed run as an uninterrupted one)
        set_rng_state(rng, self.device)
        if failure is not None:
            self.use_graph, self.graph_failure = False, failure
            warnings.warn(f"the training step cannot be captured as a CUDA graph ({failure}); "
                          "training without one (slower, same results)", RuntimeWarning, stacklevel=2)

    def _warm_up(self) -> None:
        """Three eager steps on a side stream, as graph capture wants: the first lets cuDNN pick
        its kernels and Adam make its state; in the other two a host sync raises an error."""
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        try:
            with torch.cuda.stream(side):
                self._step(self.static_inputs)
                previous = torch.cuda.get_sync_debug_mode()
                with warnings.catch_warnings():  # torch warns at each switch that the mode is a prototype
                    warnings.filterwarnings("ignore", message="Synchronization debug mode is a prototype")
                    torch.cuda.set_sync_debug_mode("error")
                    try:
                        for _ in range(2):
                            self._step(self.static_inputs)
                    finally:
                        torch.cuda.set_sync_debug_mode(previous)
        finally:
            torch.cuda.current_stream(self.device).wait_stream(side)

    def _capture_graph(self) -> None:
        graph = torch.cuda.CUDAGraph()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.cuda.graph(graph):
            self._graph_examples = self._step(self.static_inputs)
        self.graph = graph

    def _global_sums(self) -> tuple[float, float, int]:
        """(loss sum, correct, examples) over all ranks: one device sync, one all-reduce if several."""
        sums = torch.stack([self.loss_sum.double(), self.correct_sum.double(),
                            self.loss_sum.new_tensor(self.examples, dtype=torch.float64)])
        loss, correct, examples = self.group.all_sum(sums).tolist()
        return loss, correct, int(examples)

    def take_means(self, reset: bool = True) -> tuple[float, float]:
        """Mean loss and accuracy since the last reset, over all ranks; resets the sums unless told not to."""
        loss, correct, examples = self._global_sums()
        steps = self.steps
        if reset:
            self.loss_sum.zero_()
            self.correct_sum.zero_()
            self.examples, self.steps = 0, 0
        return loss / max(steps, 1), correct / max(examples, 1)

    def state_dict(self) -> dict:
        """The global sums, whatever the number of ranks (every rank must call it)."""
        loss, correct, examples = self._global_sums()
        return {"loss_sum": torch.tensor(loss, dtype=torch.float32), "correct_sum": torch.tensor(correct),
                "examples": examples, "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        """Rank 0 takes the saved global sums, the other ranks start from zero."""
        self.loss_sum.zero_()
        self.correct_sum.zero_()
        self.examples, self.steps = 0, int(state["steps"])
        if self.group.is_main:
            self.loss_sum.copy_(state["loss_sum"])
            self.correct_sum.copy_(state["correct_sum"])
            self.examples = int(state["examples"])


def _state_in_param_layouts(optimizer: torch.optim.Optimizer) -> None:
    """Lay each loaded moment out as its parameter is: load_state_dict keeps the saved strides,
    and a run resumed in another memory format (allowed) would then have channels_last weights
    with contiguous moments, which fused Adam refuses on a GPU."""
    for p, st in optimizer.state.items():
        for key, value in st.items():
            if torch.is_tensor(value) and value.shape == p.shape and value.stride() != p.stride():
                st[key] = torch.empty_like(p, dtype=value.dtype).copy_(value)


def _param_groups(saved) -> list | None:
    """A saved optimizer state's param_groups, None when it has none to read (load_state says why)."""
    groups = saved.get("param_groups") if isinstance(saved, dict) else None
    return groups if isinstance(groups, list) else None


def _first_cause(err: BaseException) -> str:
    """The error at the root of a chain (CUDA reports a failed capture as a second error raised
    while handling the first), as 'Type: first line'."""
    for _ in range(10):
        # torch.compile's BackendCompilerFailed holds its cause as inner_exception, raised `from None`
        inner = (getattr(err, "inner_exception", None) or err.__cause__
                 or (None if err.__suppress_context__ else err.__context__))
        if inner is None:
            break
        err = inner
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}"


class _InterruptFlag:
    """First Ctrl-C asks the loop to stop at the next step boundary; a second one aborts, unless
    it comes while the save the first asked for is being written (it lets that finish; a third
    aborts that too). SIGTERM (`kill`, a job scheduler's time limit) asks what a first Ctrl-C
    does, however often it comes: a scheduler may send it to every process of the job, and again.

    Off under --distributed: the ranks would see it at different steps, and torchrun stops
    every process on Ctrl-C anyway (resume from the last checkpoint).
    """

    def __init__(self, enabled: bool = True):
        self.presses = 0
        # the save the first Ctrl-C asked for is being written: a second Ctrl-C waits for it, a
        # third does not (a save that hangs on a stalled disk)
        self.saving = False
        self.enabled = enabled
        self._taken = contextlib.ExitStack()

    @property
    def set(self) -> bool:
        return self.presses > 0

    def __enter__(self):
        interrupts.training_stop_asked = False
        if self.enabled:
            self._taken.enter_context(interrupts.taking_over(signal.SIGINT, self._handle))
            self._taken.enter_context(interrupts.taking_over(signal.SIGTERM, self._handle_term))
        return self

    def _handle(self, signum, frame):
        self.presses += 1
        interrupts.training_stop_asked = True
        if self.presses >= (3 if self.saving else 2):
            raise KeyboardInterrupt

    def _handle_term(self, signum, frame):
        self.presses = max(self.presses, 1)
        interrupts.training_stop_asked = True

    def __exit__(self, *exc):
        self._taken.close()


HISTOGRAM_BINS = 64


def write_weight_histograms(writer, named_parameters, step: int, bins: int = HISTOGRAM_BINS) -> None:
    """Each weight tensor's histogram in TensorBoard, binned where the weights live and fetched in
    one transfer, where add_histogram copies every weight to the host to bin it in NumPy
    (`benchmarks/histogram_time.py`: 1.7x faster for the ConvNet, 4x for EfficientNet-Lite0 on
    the development CPU)."""
    names, rows = [], []
    for name, p in named_parameters:
        x = p.detach().flatten().float()
        lo, hi = torch.aminmax(x)
        # (x - lo) / width first: bins / width overflows for a range under 1e-37; lo == hi (0 / 0)
        # lands in bucket 0, and the host writes that case as one bucket anyway
        bucket = ((x - lo) / (hi - lo) * bins).long().clamp_(0, bins - 1)  # hi goes into the last bin
        counts = torch.bincount(bucket, minlength=bins).double()
        sums = torch.stack([x.sum(dtype=torch.float64), torch.dot(x, x).double()])
        rows.append(torch.cat([torch.stack([lo, hi]).double(), sums, counts]))
        names.append((name, x.numel()))
    if not rows:
        return
    for (name, num), row in zip(names, torch.stack(rows).cpu().tolist()):
        lo, hi, total, squares, counts = *row[:4], row[4:]
        if lo == hi:  # one value throughout (biases at 0): one bucket
            limits, counts = [hi], [float(num)]
        else:
            limits = [lo + (hi - lo) * (i + 1) / bins for i in range(bins)]
            limits[-1] = hi
        writer.add_histogram_raw(name, min=lo, max=hi, num=num, sum=total, sum_squares=squares,
                                 bucket_limits=limits, bucket_counts=counts, global_step=step)


def start_after_older_event_files(tb: Path, most: float = 2.0) -> None:
    """Wait, if need be, until a new TensorBoard event file in `tb` sorts after the older ones.

    TensorBoard reads a run's event files in the order of their names, which begin with the
    second they were made in, then the host, the pid and a counter of the process, compared as
    text (".10" before ".9"). A file made in the same second as an older one may be read before
    it, and the purge of the older attempt's steps that it begins with is then undone. Waiting
    for the next second (at most `most` seconds, should an older file come from the future)
    keeps them in order."""
    newest = 0
    for path in tb.glob("events.out.tfevents.*"):
        field = path.name.split(".")[3:4]
        if field and field[0].isdigit():
            newest = max(newest, int(field[0]))
    wait = newest + 1 - time.time()
    if wait > 0:
        time.sleep(min(wait, most))


class Trainer:
    """Step-based training of one task into one run directory."""

    def __init__(self, cfg: Config, task: Task, run: RunDir, device: torch.device, progress: bool = True,
                 group: Solo | None = None):
        """`group`: this process's place among torchrun's ranks (distributed.launch); only rank 0 writes."""
        self.group = group or Solo(device)
        self.cfg, self.task, self.run, self.device = cfg, task, run, device
        self.progress = progress and self.group.is_main
        self.model = task.model
        if self.group.rank:  # a dropout stream of its own; the model was built from cfg.seed on every rank
            torch.manual_seed(cfg.seed * 1_000_003 + self.group.rank)
        self.optimizer = make_adam([p for p in self.model.parameters() if p.requires_grad], cfg.lr, device,
                                   capturable=self._use_graph())
        self.autocast = make_autocast(cfg.precision, device)
        self.interrupted_in_last_step = False  # fit() sets it
        self.runner = StepRunner(task, self.optimizer, self.autocast, self._use_graph(), self.group,
                                 compile_loss=cfg.compile)
        self.step = 0
        self._purge_from = 1  # TensorBoard drops events from this step on (another attempt's)
        self._discard: int | None = None  # see discard_after
        self.writer = None
        # cumulative over resumes: time in fit()'s loop, the part of it spent evaluating/logging,
        # and one-off work before the loop (the transfer study's feature cache): wall time, not training
        self.clock = {"wall": 0.0, "eval": 0.0, "prepare": 0.0}
        self._started = time.perf_counter()

    def _sync_phase(self) -> None:
        """The task's `prepare_step`: it may do one-off work first (the transfer study builds its
        feature cache) and start training more parameters at this step (refine-after-K): those
        join Adam as a new group and the CUDA graph is captured anew."""
        more = self.task.prepare_step(self.step) if hasattr(self.task, "prepare_step") else None
        if more:
            self.optimizer.add_param_group({"params": more})
            self.runner.graph = None
            self.runner.wrap_anew()

    def _prepare(self) -> None:
        """_sync_phase before the loop (at the start of fit, or of a resume), timed as one-off work."""
        start = time.perf_counter()
        self._sync_phase()
        self.clock["prepare"] += time.perf_counter() - start

    def _use_graph(self) -> bool:
        # Not under --distributed: DDP's all-reduce hooks in backward are not captured here.
        return self.cfg.cuda_graph and self.device.type == "cuda" and not self.group.distributed

    # -- checkpoints -------------------------------------------------------------------------
    def _training_state(self) -> dict:
        """What last.pt holds; under --distributed every rank takes part (sums, RNG states)."""
        rng = rng_state(self.device)
        state = {
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "accumulators": self.runner.state_dict(),
            "rng_cpu": rng["cpu"],
            "clock": {"wall": self._wall(), "eval": self.clock["eval"], "prepare": self.clock["prepare"]},
        }
        if "cuda" in rng:
            state["rng_cuda"] = rng["cuda"]
        if hasattr(self.task, "resume_state"):
            state["task"] = self.task.resume_state()
        if getattr(self.task, "data_digest", None):
            state["data_digest"] = self.task.data_digest
        if self.group.distributed:
            state["rng_ranks"] = self.group.gather({k: v.cpu() for k, v in rng.items()})
        return state

    def save_checkpoint(self, weights_too: bool = True) -> None:
        """Every rank calls it (the ranks hold the same weights); rank 0 writes."""
        if not all(torch.isfinite(p).all() for p in self.model.parameters()):
            raise TrainingDiverged(
                f"weights are not finite at step {self.step}, so they are not saved; "
                f"{self.run.last_good_hint()}"
            )
        state = self._training_state()
        if self.group.is_main:
            if weights_too:
                self.run.save_weights(self.step, self.model)
            self.run.save_training_state(state)

    def resume(self) -> None:
        """Continue from last.pt; every rank loads it (a run saved by another number of
        processes resumes too, the other ranks then with fresh dropout streams)."""
        state = self.run.load_training_state(self.device)
        last = self.run.checkpoints / "last.pt"
        trained_on, now = state.get("data_digest"), getattr(self.task, "data_digest", None)
        if trained_on and now and trained_on != now:
            raise CifarlabError(f"{self.run.path} was trained on other images than the data given now holds "
                                f"({self.cfg.data or 'the default data'}); resume it on its own data, or train a new run")
        load_state(self.model, state["model"], last, "it belongs to another run: train this one anew")
        self.step = int(state["step"])
        self.clock = {"prepare": 0.0, **{k: float(v) for k, v in state["clock"].items()}}
        # The optimizer must have the groups it had when saved. A checkpoint at step K (refine
        # after K) was saved before the backbone's group joined: load it first, then let
        # _prepare add that group fresh, as the uninterrupted run does at K. Saved later, the
        # group was in it: _prepare adds it, then the load fills it. (_prepare may build a cache.)
        saved_groups = _param_groups(state["optimizer"])
        load_first = saved_groups is not None and len(saved_groups) == len(self.optimizer.param_groups)
        if not load_first:
            self._prepare()
        load_state(self.optimizer, self._in_this_process(state["optimizer"]), last,
                   "it belongs to another run: train this one anew")
        if load_first:
            self._prepare()
        _state_in_param_layouts(self.optimizer)
        self.runner.load_state_dict(state["accumulators"])
        ranks = state.get("rng_ranks", [])
        if len(ranks) == self.group.world_size > 1:
            set_rng_state(ranks[self.group.rank], self.device)
        elif self.group.is_main:
            set_rng_state({"cpu": state["rng_cpu"], "cuda": state.get("rng_cuda")}, self.device)
        if "task" in state and hasattr(self.task, "load_resume_state"):
            self.task.load_resume_state(state["task"])
        # What lies past the step it resumes from is an abandoned attempt's (a crash between a
        # step's weights and last.pt); the log of a last step off the eval cadence is not part
        # of a longer run (an uninterrupted one has none there): both go.
        keep = self.step if self._on_cadence(self.step) or self.step >= self.cfg.steps else self.step - 1
        logged_to = max((row["step"] for row in self.run.metrics), default=0)
        due = self.step - self.step % self.cfg.eval_every  # the last evaluation the saved run made
        if logged_to < due:  # a resume would leave a gap in the curves (every rank read the file: all stop)
            raise CifarlabError(f"{self.run.path / 'metrics.csv'}: ends at step {logged_to}, but {last} was saved "
                                f"at step {self.step}, after an evaluation at step {due}: the file was cut short or "
                                "replaced; put back the run's own metrics.csv")
        self.discard_after(self.step, keep)

    def discard_after(self, step: int, rows_upto: int) -> None:
        """Drop the metrics rows after `rows_upto` and the weights files after `step`: from the
        records in memory now, from disk once the first step has trained (a resume that fails
        before it leaves the run's files as they were)."""
        self.run.metrics = [row for row in self.run.metrics if row["step"] <= rows_upto]
        self._discard = step
        self._purge_from = rows_upto + 1  # TensorBoard: what was logged after the rows kept

    def _apply_discard(self) -> None:
        if self._discard is not None and self.group.is_main:
            self.run.discard_after(self._discard, self.run.metrics)
        self._discard = None

    _IMPLEMENTATION = ("capturable", "foreach", "fused")

    def _in_this_process(self, saved: dict) -> dict:
        """The saved optimizer state with Adam's implementation flags as this process set them.

        load_state_dict takes every saved group setting, these too: a run saved on a GPU (Adam
        capturable, for the CUDA graph) would then fail on a CPU, and one saved on a CPU could not
        be captured on a GPU. They say how Adam runs here, not what the run is. (load_state_dict
        then puts the step counts where these flags want them.)"""
        groups = _param_groups(saved)
        if groups is None or len(groups) != len(self.optimizer.param_groups):
            return saved  # load_state reports the mismatch
        here = [{key: mine[key] for key in self._IMPLEMENTATION if key in mine} for mine in self.optimizer.param_groups]
        return {**saved, "param_groups": [{**group, **flags} if isinstance(group, dict) else group
                                          for group, flags in zip(groups, here)]}

    # -- logging -----------------------------------------------------------------------------
    def _tb(self):
        if self.writer is None and self.cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # events after the step this process started from are another attempt's (a crashed
            # one logged past its last checkpoint): TensorBoard drops them
            start_after_older_event_files(self.run.path / "tb")
            self.writer = SummaryWriter(str(self.run.path / "tb"), purge_step=self._purge_from)
        return self.writer

    def _resume_command(self) -> str:
        return f"cifarlab train {self.cfg.study} --resume {shlex.quote(str(self.run.path))}"

    def _wall(self) -> float:
        return self.clock["wall"] + time.perf_counter() - self._started

    def _log(self) -> dict[str, tuple[float, float]]:
        """Every rank reduces the train means (so all stop together on a NaN); rank 0 alone
        evaluates and writes.

        The last step is logged even off the eval cadence; its train sums are kept (in last.pt
        too), so that a resume to more steps logs the same means as an uninterrupted run."""
        train = self.runner.take_means(reset=self._on_cadence(self.step))
        eval_start = time.perf_counter()
        elapsed = self._wall()
        if not math.isfinite(train[0]):
            raise TrainingDiverged(
                f"training loss became {train[0]} before step {self.step}; "
                f"{self.run.last_good_hint()} Try a lower --lr."
            )
        results = {"train": train, **self.task.evaluate()} if self.group.is_main else {"train": train}
        bad = [f"{split} loss {loss}" for split, (loss, _) in results.items() if not math.isfinite(loss)]
        if self.group.distributed:  # rank 0 alone evaluates: the others must stop with it, not wait for it
            anyone = self.group.all_sum(torch.tensor([float(bool(bad))], device=self.device)).item() > 0
            if anyone and not bad:
                bad = ["rank 0's evaluation loss"]
        if bad:  # finite weights whose outputs overflow: diverged all the same
            hint = self.run.last_good_hint() if self.group.is_main else "see rank 0's message."
            raise TrainingDiverged(f"{', '.join(bad)} at step {self.step}; {hint} Try a lower --lr.")
        if not self.group.is_main:
            return {"train": train}
        for split, (loss, acc) in results.items():
            self.run.add_metric(self.step, split, loss, acc, elapsed)
            writer = self._tb()
            if writer is not None:
                writer.add_scalar(f"{split}/loss", loss, self.step)
                writer.add_scalar(f"{split}/accuracy", acc, self.step)
        writer = self._tb()
        if writer is not None:
            write_weight_histograms(writer, self.model.named_parameters(), self.step)
            writer.flush()
        self.run.write_metrics()
        self.clock["eval"] += time.perf_counter() - eval_start
        return results

    def _evaluate_and_log(self) -> dict[str, tuple[float, float]]:
        self.model.eval()
        results = self._log()
        self.model.train()
        return results

    def _on_cadence(self, step: int) -> bool:
        return step % self.cfg.eval_every == 0

    def _finish_saved_step(self) -> dict[str, tuple[float, float]]:
        """Resumed to exactly the step a Ctrl-C saved at: that step's log and weights, where the
        interrupted process did not write them (off its cadences), as the run's last step has."""
        results = {}
        if not any(row["step"] == self.step for row in self.run.metrics):
            results = self._evaluate_and_log()
        if self.step not in self.run.weight_steps():
            self.save_checkpoint()
        return results

    # -- the loop ----------------------------------------------------------------------------
    def fit(self) -> dict | None:
        """Train to cfg.steps; the summary (None on ranks other than 0)."""
        cfg = self.cfg
        self.model.train()
        if self._discard is None:
            self._purge_from = self.step + 1
        # before the clock and the Ctrl-C flag: a one-off pass such as the transfer study's
        # feature cache is not training time (but wall time), and Ctrl-C stops it at once
        self._prepare()
        self._started = time.perf_counter()
        bar = _progress(cfg.steps, self.step, self.progress, self.run.name)
        last = {}
        tick_at = time.perf_counter()
        interrupt = _InterruptFlag(enabled=not self.group.distributed)
        try:
            if self.step == cfg.steps:
                self._apply_discard()
                last = self._finish_saved_step()
            with interrupt:
                while self.step < cfg.steps:
                    self._sync_phase()
                    compiling = bar is not None and self.runner.compile_pending
                    if compiling:  # torch.compile at work: half a minute or more with the bar standing still
                        bar.set_postfix_str("compiling the step (torch.compile)", refresh=True)
                    self.runner.run(self.step)
                    self.step += 1
                    self._apply_discard()  # the first step trained: the resume stands
                    if compiling:
                        bar.set_postfix(_postfix(last) if last else {}, refresh=False)
                    log_now = self._on_cadence(self.step) or self.step == cfg.steps
                    ckpt_now = self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps
                    if log_now:
                        last = self._evaluate_and_log()
                        if bar is not None:
                            bar.set_postfix(_postfix(last), refresh=False)
                    if ckpt_now:
                        self.save_checkpoint()
                    if bar is not None and (log_now or time.perf_counter() - tick_at > 0.5):
                        bar.update(self.step - bar.n)
                        tick_at = time.perf_counter()
                    if interrupt.set and self.step < cfg.steps:
                        interrupt.saving = True
                        self.save_checkpoint(weights_too=False)
                        raise TrainingInterrupted(
                            f"interrupted at step {self.step}; progress saved. "
                            f"Continue with: {self._resume_command()}"
                        )
            # A Ctrl-C in the last step (its evaluation and checkpoint) finds the run finished;
            # the caller still has to hear of it (reproduce must not go on to the next run).
            self.interrupted_in_last_step = interrupt.set
        except KeyboardInterrupt:
            if not interrupt.set:  # not the flag's second Ctrl-C (it is off under --distributed)
                raise
            # a second Ctrl-C: stop now, without saving this step
            saved = self.run.saved_step() if self.group.is_main else None
            where = (f"{self._resume_command()} goes on from the last checkpoint (step {saved})" if saved is not None
                     else f"nothing was saved yet: {self._resume_command()} trains it from the start")
            raise TrainingInterrupted(f"interrupted twice at step {self.step}: stopped without saving; {where}") \
                from None
        finally:
            if bar is not None:
                bar.close()
            if self.writer is not None:
                self.writer.close()
        if not self.group.is_main:
            return None
        wall = self._wall()
        extra = self.task.summary() if hasattr(self.task, "summary") else {}
        if self.device.type == "cuda":
            extra = {**extra, "cuda_graph": self.runner.use_graph}
            if self.runner.graph_failure:
                extra["cuda_graph_failure"] = self.runner.graph_failure
        if self.group.distributed:
            extra = {**extra, "processes": self.group.world_size}
        return self.run.write_summary(self.cfg, wall + self.clock["prepare"], wall - self.clock["eval"], self.device,
                                      extra)


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
