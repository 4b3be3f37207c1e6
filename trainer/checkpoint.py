"""Checkpoints of a training run: everything `fit` needs to go on as if never interrupted.

A `Checkpoint` is taken after a finished epoch (fit's `checkpoint_when`/`on_checkpoint`) and
passed back as fit's `resume`: the run then continues at the next epoch and ends with the
same weights, history (wall-clock "seconds"/"train_seconds" aside), best epoch, stop reason
and test metrics, bit for bit, as the run that was never interrupted.

`to_bytes` writes an uncompressed .npz (np.savez): the arrays, plus a member "header" that
holds the scalars, the history, the random streams' states and the fingerprint as UTF-8
JSON. Nothing is pickled, and `from_bytes` loads with allow_pickle=False, so reading a
checkpoint never runs code. The fingerprint (the TrainConfig, the dataset's shape and a
digest of its arrays) makes a checkpoint resume only the run it was taken from.

`RunState` is the part of a fit that lives across epochs: history, the early-stopping state
and the best weights, next to the network, optimizer and random streams it captures from
and restores into. The per-step counters stay in fit's locals (its hot loop) and come and
go as `Counters`. Dropout masks and input noise are drawn afresh each epoch, so nothing of
them outlives an epoch but the noise stream's state.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import numbers
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from trainer.config import TrainConfig, metric_mode

if TYPE_CHECKING:
    from trainer.datasets import Dataset
    from trainer.fit import Rngs
    from trainer.network import MLP
    from trainer.optimizers import Optimizer

FORMAT = "hptune-trainer-checkpoint"
VERSION = 1
# Per-parameter optimizer buffers that are scratch (written before being read in every
# step), by optimizer class: not saved. A class not listed has every buffer saved.
_SCRATCH: dict[str, tuple[int, ...]] = {
    "Momentum": (1,), "Nesterov": (1,), "RMSprop": (1,), "Adagrad": (1,),
}
_FLOATS = ("float32", "float64")


class Counters(NamedTuple):
    """fit's per-step state at an epoch's end."""

    step: int  # optimizer steps taken: the schedule's position and the optimizer's t
    seen: int  # training examples stepped on
    next_mark: int | None  # the next eval_every_examples multiple to evaluate at
    loss_bound: float | None  # divergence bound, set by the run's first batch


@dataclass(eq=False)
class Checkpoint:
    """The whole state of a fit after `epoch` finished epochs."""

    epoch: int  # last finished epoch (1-based)
    history: list[dict[str, float]]  # the rows of epochs 1..epoch
    params: np.ndarray  # the network's flat parameters (MLP.params layout)
    best_params: np.ndarray  # the parameters of best_epoch
    optimizer: str  # the optimizer's class name
    optimizer_state: dict[str, np.ndarray]  # "i.j": buffer j of parameter array i
    step: int
    examples_seen: int
    next_mark: int | None
    best_epoch: int | None
    best_value: float | None
    since_best: int  # epochs since best_epoch, for patience
    loss_bound: float | None
    rng_states: dict[str, dict[str, Any]]  # Rngs field -> its bit_generator.state
    fingerprint: dict[str, Any]  # see fingerprint()

    def to_bytes(self) -> bytes:
        """The checkpoint as .npz bytes: arrays plus a JSON header; no pickle."""
        header: dict[str, Any] = {"format": FORMAT, "version": VERSION}
        header["optimizer_state"] = sorted(self.optimizer_state)
        header.update({name: getattr(self, name) for name in _HEADER_FIELDS})
        text = json.dumps(header, default=_plain)
        arrays = {f"optimizer.{k}": v for k, v in self.optimizer_state.items()}
        buf = io.BytesIO()
        np.savez(buf, header=np.frombuffer(text.encode(), np.uint8), params=self.params,
                 best_params=self.best_params, **arrays)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> Checkpoint:
        """Read what to_bytes wrote; anything else raises ValueError."""
        if not isinstance(data, bytes | bytearray | memoryview):
            raise TypeError(f"a checkpoint is read from bytes, got {type(data).__name__}")
        try:
            npz = np.load(io.BytesIO(data), allow_pickle=False)
            if not isinstance(npz, np.lib.npyio.NpzFile):
                raise ValueError("a single .npy array, not an .npz archive")
            with npz:
                arrays = {name: npz[name] for name in npz.files}
            header = json.loads(arrays.pop("header").tobytes().decode())
        except Exception as exc:  # garbled bytes raise all sorts; all mean "not a checkpoint"
            raise ValueError(f"not a trainer checkpoint: {type(exc).__name__}: {exc}") from exc
        return _parse(header, arrays)

    def check(self, config: TrainConfig, data: Dataset, digest: str | None = None) -> None:
        """Raise ValueError unless this checkpoint was taken by a fit of (config, data)."""
        want = fingerprint(config, data, digest)
        got = self.fingerprint
        if got["config"] != want["config"]:
            keys = sorted(set(got["config"]) | set(want["config"]))
            diff = [k for k in keys if got["config"].get(k) != want["config"].get(k)]
            raise ValueError(f"the checkpoint is of another TrainConfig (differs in {diff})")
        if got["data"] != want["data"]:
            raise ValueError(
                f"the checkpoint is of a dataset shaped {got['data']}, not {want['data']}"
            )
        if got["data_digest"] != want["data_digest"]:
            raise ValueError("the checkpoint is of other data of the same shape")


_HEADER_FIELDS = (
    "epoch", "history", "optimizer", "step", "examples_seen", "next_mark", "best_epoch",
    "best_value", "since_best", "loss_bound", "rng_states", "fingerprint",
)


def fingerprint(config: TrainConfig, data: Dataset, digest: str | None = None) -> dict[str, Any]:
    """What a checkpoint must match to resume: the config, the data's shape and contents."""
    arrays = (data.X_train, data.y_train, data.X_val, data.y_val, data.X_test, data.y_test)
    return {
        "config": json.loads(json.dumps(config.to_dict())),
        "data": {"task": str(data.task), "n_features": int(data.n_features),
                 "n_classes": int(data.n_classes), "rows": [len(a) for a in arrays[::2]]},
        "data_digest": digest or data_digest(arrays),
    }


def data_digest(arrays) -> str:
    """A content hash of arrays (their dtypes, shapes and bytes)."""
    h = hashlib.blake2b(digest_size=16)
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape};".encode())
        h.update(memoryview(a).cast("B"))
    return h.hexdigest()


class RunState:
    """A fit's state across epochs; it takes checkpoints and resumes from them."""

    def __init__(self, config: TrainConfig, data: Dataset, net: MLP, optimizer: Optimizer,
                 rngs: Rngs) -> None:
        self.config, self.data, self.net, self.optimizer, self.rngs = (
            config, data, net, optimizer, rngs)
        self.history: list[dict[str, float]] = []
        self.best_epoch: int | None = None
        self.best_value: float | None = None
        self.since_best = 0
        self.best_params = net.params.copy()
        self._mode = metric_mode(config.monitor)
        self._digest: str | None = None  # computed once, on the first checkpoint or resume

    def update(self, epoch: int, value: float) -> None:
        """Track the best epoch, given the monitored value of a finished epoch."""
        if improves(value, self.best_value, self._mode, self.config.min_delta):
            self.best_epoch, self.best_value, self.since_best = epoch, value, 0
            np.copyto(self.best_params, self.net.params)
        else:
            self.since_best += 1

    @property
    def out_of_patience(self) -> bool:
        """True when `patience` epochs in a row did not improve."""
        return self.config.patience is not None and self.since_best >= self.config.patience

    def _fingerprint(self) -> dict[str, Any]:
        if self._digest is None:
            self._digest = fingerprint(self.config, self.data)["data_digest"]
        return fingerprint(self.config, self.data, self._digest)

    def capture(self, epoch: int, counters: Counters) -> Checkpoint:
        """A Checkpoint of the run after `epoch`; copies only, draws nothing."""
        rngs = self.rngs._asdict()
        return Checkpoint(
            epoch=epoch,
            history=[dict(row) for row in self.history],
            params=self.net.params.copy(),
            best_params=self.best_params.copy(),
            optimizer=type(self.optimizer).__name__,
            optimizer_state={k: a.copy() for k, a in _saved_buffers(self.optimizer).items()},
            step=counters.step,
            examples_seen=counters.seen,
            next_mark=counters.next_mark,
            best_epoch=self.best_epoch,
            best_value=self.best_value,
            since_best=self.since_best,
            loss_bound=counters.loss_bound,
            rng_states={name: _plain_json(gen.bit_generator.state) for name, gen in rngs.items()},
            fingerprint=self._fingerprint(),
        )

    def start(self, ckpt: Checkpoint | None) -> Counters:
        """The counters of a fresh run, or restore `ckpt` into this run and return its."""
        if ckpt is None:
            return Counters(0, 0, self.config.eval_every_examples, None)
        if not isinstance(ckpt, Checkpoint):
            raise TypeError(f"resume must be a Checkpoint, got {type(ckpt).__name__}")
        ckpt.check(self.config, self.data, self._fingerprint()["data_digest"])
        net, opt = self.net, self.optimizer
        if ckpt.params.shape != net.params.shape or ckpt.params.dtype != net.params.dtype:
            raise ValueError(f"the checkpoint's parameters {ckpt.params.shape} "
                             f"{ckpt.params.dtype} do not fit this network")
        if ckpt.optimizer != type(opt).__name__ or ckpt.epoch > self.config.max_epochs:
            raise ValueError(f"the checkpoint ({ckpt.optimizer}, epoch {ckpt.epoch}) is not "
                             f"of this run ({type(opt).__name__}, {self.config.max_epochs} epochs)")
        self._restore_rngs(ckpt.rng_states)
        opt.t = ckpt.step
        opt._state = [opt._init_state(p) for p in (net.params,)]
        buffers = _saved_buffers(opt)
        if set(buffers) != set(ckpt.optimizer_state):
            raise ValueError(f"the checkpoint's optimizer buffers {sorted(ckpt.optimizer_state)}"
                             f" are not this optimizer's {sorted(buffers)}")
        for key, buf in buffers.items():
            np.copyto(buf, ckpt.optimizer_state[key])
        np.copyto(net.params, ckpt.params)
        np.copyto(self.best_params, ckpt.best_params)
        self.history[:] = [dict(row) for row in ckpt.history]
        self.best_epoch, self.best_value = ckpt.best_epoch, ckpt.best_value
        self.since_best = ckpt.since_best
        return Counters(ckpt.step, ckpt.examples_seen, ckpt.next_mark, ckpt.loss_bound)

    def _restore_rngs(self, states: dict[str, dict[str, Any]]) -> None:
        rngs = self.rngs._asdict()
        if set(states) != set(rngs):
            raise ValueError(f"the checkpoint's random streams {sorted(states)} are not "
                             f"{sorted(rngs)}")
        for name, gen in rngs.items():
            try:
                gen.bit_generator.state = states[name]
            except (KeyError, TypeError, ValueError, OverflowError) as exc:
                raise ValueError(f"bad state of random stream {name!r}: {exc}") from exc


def improves(value: float, best: float | None, mode: str, min_delta: float) -> bool:
    """Whether a finite `value` beats `best` by more than min_delta in direction `mode`."""
    if not math.isfinite(value):
        return False
    if best is None:
        return True
    return value > best + min_delta if mode == "max" else value < best - min_delta


def _saved_buffers(opt: Optimizer) -> dict[str, np.ndarray]:
    """The optimizer's buffers that carry state from step to step, by "i.j"."""
    scratch = _SCRATCH.get(type(opt).__name__, ())
    return {
        f"{i}.{j}": buf
        for i, bufs in enumerate(opt._state or ())
        for j, buf in enumerate(bufs)
        if j not in scratch
    }


def _plain_json(value: Any) -> Any:
    """value as JSON would give it back (SFC64's state holds a uint64 array)."""
    return json.loads(json.dumps(value, default=_plain))


def _plain(value: Any) -> Any:
    if isinstance(value, np.ndarray | np.generic):
        return value.tolist()
    raise TypeError(f"cannot store a {type(value).__name__} in a checkpoint header")


def _parse(header: Any, arrays: dict[str, np.ndarray]) -> Checkpoint:
    """Validate what from_bytes read and build the Checkpoint."""
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ValueError("not a trainer checkpoint: its header does not name the format")
    if header.get("version") != VERSION:
        raise ValueError(f"checkpoint version {header.get('version')!r} is not {VERSION}")
    missing = [k for k in (*_HEADER_FIELDS, "optimizer_state") if k not in header]
    if missing:
        raise ValueError(f"the checkpoint's header lacks {missing}")
    keys = header["optimizer_state"]
    if not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)):
        raise ValueError("the checkpoint's optimizer_state is not a list of names")
    expected = {"params", "best_params", *(f"optimizer.{k}" for k in keys)}
    if set(arrays) != expected:
        raise ValueError(f"the checkpoint holds arrays {sorted(arrays)}, not {sorted(expected)}")
    params = arrays["params"]
    if params.ndim != 1 or params.dtype.name not in _FLOATS:
        raise ValueError(f"the checkpoint's params are {params.dtype} {params.shape}, "
                         "not a flat float array")
    for name, a in arrays.items():
        if a.shape != params.shape or a.dtype != params.dtype:
            raise ValueError(f"the checkpoint's {name} is {a.dtype} {a.shape}, not like params")
    h = header
    epoch = _int(h, "epoch", low=1)
    history = h["history"]
    if not (isinstance(history, list) and len(history) == epoch and all(
            _is_row(row, i + 1) for i, row in enumerate(history))):
        raise ValueError(f"the checkpoint's history is not {epoch} rows of metrics")
    best_epoch = _int(h, "best_epoch", low=1, optional=True)
    if best_epoch is not None and best_epoch > epoch:
        raise ValueError(f"the checkpoint's best_epoch {best_epoch} is past its epoch {epoch}")
    for name, kind in (("optimizer", str), ("rng_states", dict), ("fingerprint", dict)):
        if not isinstance(h[name], kind):
            raise ValueError(f"the checkpoint's {name} is not a {kind.__name__}")
    if not all(isinstance(h["fingerprint"].get(k), t) for k, t in _FINGERPRINT.items()):
        raise ValueError("the checkpoint's fingerprint is malformed")
    return Checkpoint(
        epoch=epoch, history=history, params=params, best_params=arrays["best_params"],
        optimizer=h["optimizer"],
        optimizer_state={k: arrays[f"optimizer.{k}"] for k in keys},
        step=_int(h, "step", low=0), examples_seen=_int(h, "examples_seen", low=0),
        next_mark=_int(h, "next_mark", low=1, optional=True), best_epoch=best_epoch,
        best_value=_number(h, "best_value"), since_best=_int(h, "since_best", low=0),
        loss_bound=_number(h, "loss_bound"), rng_states=h["rng_states"],
        fingerprint=h["fingerprint"],
    )


_FINGERPRINT = {"config": dict, "data": dict, "data_digest": str}


def _int(h: dict[str, Any], name: str, low: int, optional: bool = False) -> int | None:
    value = h[name]
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"the checkpoint's {name} is {value!r}, not an int >= {low}")
    return value


def _number(h: dict[str, Any], name: str) -> float | None:
    value = h[name]
    if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
        raise ValueError(f"the checkpoint's {name} is {value!r}, not a number")
    return value


def _is_row(row: Any, epoch: int) -> bool:
    return (
        isinstance(row, dict)
        and row.get("epoch") == epoch
        and all(isinstance(k, str) and isinstance(v, int | float) and not isinstance(v, bool)
                for k, v in row.items())
    )
