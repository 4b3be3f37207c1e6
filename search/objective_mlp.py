"""The built-in objective `mlp`: hptune's NumPy trainer (trainer.fit) behind the objective
contract. It early-stops itself (TrainConfig.patience), can count its pruner's steps in
training examples, checkpoints its whole state (trainer.Checkpoint: a resumed trial ends
bit-identical to one never interrupted) and exports ONNX (trainer.to_onnx)."""

from __future__ import annotations

from dataclasses import replace

from search.objectives import Objective, Param, Reporter, TrialInput
from search.spec import SearchSpace
from search.study import train_config
from trainer import Checkpoint, Dataset, Task, TrainResult, fit, to_onnx


def _defaults() -> dict[str, Param]:
    """The core dimensions with the spec's default ranges."""
    space = SearchSpace()
    lr, wd, dropout = space.learning_rate, space.weight_decay, space.dropout
    return {
        "learning_rate": Param.real(lr.low, lr.high, log=lr.log),
        "batch_size": Param.categorical(*space.batch_size.choices),
        "dropout": Param.real(dropout.low, dropout.high),
        "weight_decay": Param.real(wd.low, wd.high, log=wd.log),
    }


class MLPObjective(Objective):
    name = "mlp"
    params = _defaults()
    stops_early_itself = True
    reports_examples = True

    def train(self, trial: TrialInput, reporter: Reporter) -> TrainResult:
        spec = trial.spec
        config = train_config(spec, dict(trial.params))
        on_examples = None
        if spec.pruner.resource == "examples":
            config = replace(config, eval_every_examples=(spec.pruner.report_every
                                                          or len(trial.data.X_train)))
            on_examples = reporter.on_examples
        blob = reporter.load_checkpoint()
        return fit(config, trial.data, on_epoch=reporter.on_epoch, on_examples=on_examples,
                   checkpoint_when=reporter.checkpoint_due,
                   on_checkpoint=lambda cp: reporter.save_checkpoint(cp.to_bytes()),
                   resume=Checkpoint.from_bytes(blob) if blob is not None else None)

    def export_onnx(self, result: TrainResult, data: Dataset) -> bytes | None:
        if result.network is None or data.feature_mean is None:
            return None
        labels = data.classes
        return to_onnx(result.network, feature_mean=data.feature_mean,
                       feature_std=data.feature_std, task=data.task,
                       class_labels=labels if data.task != Task.REGRESSION else None)

