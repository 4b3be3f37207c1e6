"""Checkpoint and resume: a run resumed from any epoch ends bit-identically to one never stopped."""

import dataclasses
import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from trainer import Checkpoint, Optimizer, TrainConfig, fit, load_dataset

ROOT = Path(__file__).resolve().parents[2]
WALL_CLOCK = ("seconds", "train_seconds")
LR = {"sgd": 0.05, "momentum": 0.01, "nesterov": 0.01, "adam": 3e-3, "adamw": 3e-3,
      "rmsprop": 2e-3, "adagrad": 0.03}
SCHEDULE = {"sgd": "step", "momentum": "cosine", "nesterov": "onecycle", "adam": "cosine",
            "adamw": "onecycle", "rmsprop": "step", "adagrad": "cosine"}


def config(optimizer: str = "adam", **changes) -> TrainConfig:
    """Dropout, input noise, decay, clipping, a warmed-up schedule; patience that triggers."""
    base = dict(
        hidden_layers=(32, 16), optimizer=optimizer, learning_rate=LR[optimizer],
        batch_size=64, dropout=0.2, input_noise=0.1, weight_decay=1e-4, grad_clip=5.0,
        schedule=SCHEDULE[optimizer], step_size_epochs=3, warmup_epochs=1.5, max_epochs=25,
        patience=2, monitor="val_loss", min_delta=0.01, seed=3,
    )
    return TrainConfig(**{**base, **changes})


def metrics(history):
    return [{k: v for k, v in row.items() if k not in WALL_CLOCK} for row in history]


def assert_same_run(got, want):
    assert np.array_equal(got.network.params, want.network.params)
    assert got.network.params.tobytes() == want.network.params.tobytes()
    assert json.dumps(metrics(got.history)) == json.dumps(metrics(want.history))  # NaN-safe
    for name in ("best_epoch", "best_value", "stop_reason", "stopped_epoch", "examples_seen",
                 "test_metrics", "diverged_loss"):
        assert getattr(got, name) == getattr(want, name), name


def take_checkpoints(cfg, data, **kwargs):
    """The run, taking a checkpoint (as bytes) after every epoch it goes on from."""
    saved: dict[int, bytes] = {}

    def keep(ckpt):
        assert ckpt.epoch not in saved
        saved[ckpt.epoch] = ckpt.to_bytes()

    result = fit(cfg, data, checkpoint_when=lambda epoch: True, on_checkpoint=keep, **kwargs)
    return result, saved


@pytest.mark.parametrize("optimizer", list(Optimizer))
def test_resume_from_any_epoch_is_bit_identical(digits, optimizer):
    cfg = config(optimizer)
    want = fit(cfg, digits)
    assert want.stop_reason == "early_stopped" and want.stopped_epoch < cfg.max_epochs
    got, saved = take_checkpoints(cfg, digits)
    assert_same_run(got, want)  # taking checkpoints does not perturb the run
    assert sorted(saved) == list(range(1, want.stopped_epoch))  # none after the last epoch
    best = want.best_epoch
    for k in sorted({1, 2, best // 2, best, best + 1, want.stopped_epoch - 1}):
        ckpt = Checkpoint.from_bytes(saved[k])
        resumed = fit(cfg, digits, resume=ckpt)
        assert_same_run(resumed, want)
        assert resumed.resumed_from_epoch == k
        assert resumed.history[:k] == ckpt.history  # the checkpoint's rows, wall clock too
        assert resumed.to_dict()["resumed_from_epoch"] == k
    assert want.resumed_from_epoch is None


def test_resume_regression_and_max_epochs():
    data = load_dataset("regression", seed=0)
    cfg = TrainConfig(hidden_layers=(16,), optimizer="adamw", learning_rate=3e-3, batch_size=32,
                      dropout=0.1, weight_decay=1e-3, schedule="cosine", warmup_epochs=1,
                      max_epochs=6, monitor="val_r2", seed=1)
    want, saved = take_checkpoints(cfg, data)
    assert want.stop_reason == "max_epochs" and sorted(saved) == [1, 2, 3, 4, 5]
    for k in (1, 3, 5):
        assert_same_run(fit(cfg, data, resume=Checkpoint.from_bytes(saved[k])), want)


def test_no_checkpoint_unless_asked(digits):
    cfg = config("adam", max_epochs=3, patience=None)
    taken = []
    fit(cfg, digits, on_checkpoint=taken.append)  # checkpoint_when None: never
    fit(cfg, digits, checkpoint_when=lambda epoch: True)  # nothing to hand them to
    fit(cfg, digits, checkpoint_when=lambda epoch: epoch == 2, on_checkpoint=taken.append)
    assert [c.epoch for c in taken] == [2]


def test_checkpoint_is_a_copy(digits):
    """A checkpoint handed out is not changed by the epochs trained after it."""
    cfg = config("adam", max_epochs=4, patience=None)
    taken = []
    fit(cfg, digits, checkpoint_when=lambda epoch: True, on_checkpoint=taken.append)
    first, again = taken[0], []
    assert not np.array_equal(first.params, taken[1].params)
    fit(cfg, digits, checkpoint_when=lambda epoch: epoch == 1, on_checkpoint=again.append)
    fresh = again[0]
    for name in ("params", "best_params"):
        assert getattr(fresh, name).tobytes() == getattr(first, name).tobytes()
    assert fresh.optimizer_state.keys() == first.optimizer_state.keys() == {"0.0", "0.1"}
    for key, buf in fresh.optimizer_state.items():
        assert buf.tobytes() == first.optimizer_state[key].tobytes()
    assert metrics(fresh.history) == metrics(first.history)
    assert fresh.rng_states == first.rng_states and fresh.step == first.step


def calls_recorder(prune_at_mark=None):
    calls = []

    def on_epoch(epoch, row):
        calls.append(("epoch", epoch, {k: v for k, v in row.items() if k not in WALL_CLOCK}))

    def on_examples(mark, values):
        calls.append(("examples", mark, dict(values)))
        return mark == prune_at_mark

    return calls, on_epoch, on_examples


@pytest.mark.parametrize("prune_at_mark", [None, 5000])
def test_eval_every_examples_resumes_and_skips_saved_epochs(digits, prune_at_mark):
    cfg = config("adam", eval_every_examples=500, batch_size=48)
    calls, on_epoch, on_examples = calls_recorder(prune_at_mark)
    want, saved = take_checkpoints(cfg, digits, on_epoch=on_epoch, on_examples=on_examples)
    assert want.stop_reason == ("early_stopped" if prune_at_mark is None else "pruned")
    if prune_at_mark:
        assert "examples" in want.history[-1]  # stopped inside an epoch
    n = len(digits.X_train)
    for k in sorted({1, 2, want.stopped_epoch - 1}):
        ckpt = Checkpoint.from_bytes(saved[k])
        assert ckpt.examples_seen == k * n and ckpt.next_mark > k * n
        got, on_epoch_k, on_examples_k = calls_recorder(prune_at_mark)
        resumed = fit(cfg, digits, on_epoch=on_epoch_k, on_examples=on_examples_k, resume=ckpt)
        assert_same_run(resumed, want)
        later = [c for c in calls if (c[1] > k if c[0] == "epoch" else c[1] > k * n)]
        assert got == later  # nothing reported again for the epochs the checkpoint holds
        assert got and all(c[1] > k for c in got if c[0] == "epoch")


SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from trainer import Checkpoint, TrainConfig, fit, load_dataset
    ckpt_path, config_path, out_path = map(Path, sys.argv[1:])
    cfg = TrainConfig(**json.loads(config_path.read_text()))
    result = fit(cfg, load_dataset("digits", seed=0),
                 resume=Checkpoint.from_bytes(ckpt_path.read_bytes()))
    out_path.write_bytes(result.network.params.tobytes())
    print(json.dumps(result.to_dict()))
""")


def test_resume_in_another_process(digits, tmp_path):
    cfg = config("adamw")
    want, saved = take_checkpoints(cfg, digits)
    k = want.best_epoch + 1
    (tmp_path / "ckpt.npz").write_bytes(saved[k])
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict()))
    (tmp_path / "resume.py").write_text(SCRIPT)
    threads = {v: "1" for v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env = {**os.environ, **threads, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, str(tmp_path / "resume.py"), *(str(tmp_path / f)
         for f in ("ckpt.npz", "config.json", "params.bin"))],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "params.bin").read_bytes() == want.network.params.tobytes()
    summary = json.loads(done.stdout.splitlines()[-1])
    assert summary["resumed_from_epoch"] == k
    assert summary["best_epoch"] == want.best_epoch
    assert summary["test_metrics"] == want.test_metrics
    assert json.dumps(metrics(summary["history"])) == json.dumps(metrics(want.history))


@pytest.fixture(scope="module")
def saved_checkpoint(digits):
    cfg = config("momentum", max_epochs=4, patience=None)
    _, saved = take_checkpoints(cfg, digits)
    return cfg, saved[2]


def test_round_trip_keeps_every_field(saved_checkpoint):
    _, blob = saved_checkpoint
    ckpt = Checkpoint.from_bytes(blob)
    assert ckpt.to_bytes() == blob
    assert ckpt.epoch == 2 and len(ckpt.history) == 2 and ckpt.optimizer == "Momentum"
    assert sorted(ckpt.rng_states) == ["init", "noise", "shuffle"]
    assert sorted(ckpt.optimizer_state) == ["0.0"]  # the velocity; not the scratch buffer
    assert Checkpoint.from_bytes(bytearray(blob)).to_bytes() == blob


def garbled(blob: bytes) -> list[bytes]:
    flipped = bytearray(blob)
    flipped[len(blob) // 2] ^= 0xFF
    return [b"", b"not a checkpoint", bytes(range(256)) * 8, blob[: len(blob) // 2],
            blob[:-30], bytes(flipped)]


def test_garbled_bytes_are_refused(saved_checkpoint):
    _, blob = saved_checkpoint
    for bad in garbled(blob):
        with pytest.raises(ValueError, match="checkpoint"):
            Checkpoint.from_bytes(bad)
    with pytest.raises(TypeError):
        Checkpoint.from_bytes("a string")  # type: ignore[arg-type]


def rewrite(blob: bytes, header_change=None, **arrays) -> bytes:
    """The checkpoint's npz with the header edited and arrays replaced (None drops one)."""
    with np.load(io.BytesIO(blob)) as npz:
        members = {name: npz[name] for name in npz.files}
    header = json.loads(members["header"].tobytes())
    if header_change:
        header_change(header)
    members["header"] = np.frombuffer(json.dumps(header).encode(), np.uint8)
    for name, value in arrays.items():
        if value is None:
            members.pop(name)
        else:
            members[name] = value
    buf = io.BytesIO()
    np.savez(buf, **members)
    return buf.getvalue()


def test_well_formed_but_wrong_archives_are_refused(saved_checkpoint):
    _, blob = saved_checkpoint
    assert Checkpoint.from_bytes(rewrite(blob)).to_bytes() == blob  # rewrite alone is harmless
    buf = io.BytesIO()
    np.save(buf, np.zeros(3))
    cases = {
        "a .npy": buf.getvalue(),
        "no header": rewrite(blob, header=None),
        "other format": rewrite(blob, lambda h: h.update(format="something else")),
        "future version": rewrite(blob, lambda h: h.update(version=99)),
        "short history": rewrite(blob, lambda h: h["history"].pop()),
        "missing field": rewrite(blob, lambda h: h.pop("since_best")),
        "bool epoch": rewrite(blob, lambda h: h.update(epoch=True)),
        "best past epoch": rewrite(blob, lambda h: h.update(best_epoch=3)),
        "text metric": rewrite(blob, lambda h: h["history"][0].update(val_loss="low")),
        "missing buffer": rewrite(blob, **{"optimizer.0.0": None}),
        "extra array": rewrite(blob, extra=np.zeros(3)),
        "int params": rewrite(blob, params=np.zeros(10, np.int64)),
        "short best": rewrite(blob, best_params=np.zeros(10, np.float32)),
    }
    accepted = []
    for name, bad in cases.items():
        try:
            Checkpoint.from_bytes(bad)
        except ValueError:
            continue
        accepted.append(name)
    assert not accepted


LOADED = []


def record_unpickling(what):
    LOADED.append(what)


class Payload:
    """Unpickling this would record that code ran."""

    def __reduce__(self):
        return (record_unpickling, ("unpickled",))


def test_pickled_object_arrays_are_refused(saved_checkpoint):
    _, blob = saved_checkpoint
    objects = np.array([Payload(), Payload()], dtype=object)
    evil = rewrite(blob, params=objects)
    assert b"record_unpickling" in evil  # it does hold a pickle
    with pytest.raises(ValueError, match=r"pickle|[Oo]bject"):
        Checkpoint.from_bytes(evil)
    with pytest.raises(ValueError):
        Checkpoint.from_bytes(rewrite(blob, header=objects))
    assert LOADED == []


def test_checkpoint_of_another_config_is_refused(saved_checkpoint, digits):
    cfg, blob = saved_checkpoint
    ckpt = Checkpoint.from_bytes(blob)
    for other in (dataclasses.replace(cfg, learning_rate=0.02),
                  dataclasses.replace(cfg, max_epochs=5),
                  dataclasses.replace(cfg, seed=4)):
        with pytest.raises(ValueError, match="another TrainConfig"):
            fit(other, digits, resume=ckpt)
    with pytest.raises(ValueError, match="learning_rate"):
        fit(dataclasses.replace(cfg, learning_rate=0.02), digits, resume=ckpt)
    with pytest.raises(TypeError):
        fit(cfg, digits, resume=blob)  # bytes, not a Checkpoint


def test_checkpoint_of_other_data_is_refused(saved_checkpoint, digits):
    cfg, blob = saved_checkpoint
    ckpt = Checkpoint.from_bytes(blob)
    fewer_rows = dataclasses.replace(digits, X_train=digits.X_train[:-10],
                                     y_train=digits.y_train[:-10])
    fewer_features = dataclasses.replace(digits, X_train=digits.X_train[:, :-1],
                                         X_val=digits.X_val[:, :-1],
                                         X_test=digits.X_test[:, :-1])
    for data in (fewer_rows, fewer_features):
        with pytest.raises(ValueError, match="dataset shaped"):
            fit(cfg, data, resume=ckpt)
    shuffled = dataclasses.replace(digits, X_train=digits.X_train[::-1].copy())
    with pytest.raises(ValueError, match="other data"):
        fit(cfg, shuffled, resume=ckpt)
    fit(cfg, digits, resume=ckpt)  # the right data still resumes


def test_bad_random_state_is_refused(saved_checkpoint, digits):
    cfg, blob = saved_checkpoint

    def break_noise(h):
        h["rng_states"]["noise"] = h["rng_states"]["shuffle"]  # PCG64 state for SFC64

    ckpt = Checkpoint.from_bytes(rewrite(blob, break_noise))
    with pytest.raises(ValueError, match="noise"):
        fit(cfg, digits, resume=ckpt)
