"""Same network, same initial weights, same batches: losses match PyTorch's for 2 epochs.

Dropout masks and input noise are replayed from fit's own random streams (make_rngs), block
by block as fit draws them, so runs with dropout/input_noise compare exactly too.
"""

import numpy as np
import pytest

from trainer import TrainConfig, fit, load_dataset
from trainer.fit import NOISE_BLOCK_VALUES, _Dropout, build_network, make_rngs

torch = pytest.importorskip("torch", reason="PyTorch is not installed; reference test skipped")

EPOCHS = 2


class _FixedMask(torch.nn.Module):
    """Multiplies by `mask` (rows, width) when one is set: dropout with replayed masks."""

    def __init__(self):
        super().__init__()
        self.mask = None

    def forward(self, x):
        return x if self.mask is None else x * self.mask


def _torch_run(config: TrainConfig, data, epochs: int):
    """Train the same MLP in PyTorch on fit's exact batch order; return per-epoch losses."""
    torch.set_num_threads(1)
    rngs = make_rngs(config.seed)
    net = build_network(config, data, rngs.init)
    acts = {"relu": torch.nn.ReLU, "tanh": torch.nn.Tanh}
    layers, drops = [], []
    for i, (w, b) in enumerate(net.get_weights()):
        lin = torch.nn.Linear(*w.shape)
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(w.T.copy()))
            lin.bias.copy_(torch.from_numpy(b))
        layers.append(lin)
        if i < len(net.weights) - 1:
            layers.append(acts[config.activation]())
            drops.append(_FixedMask())
            layers.append(drops[-1])
    model = torch.nn.Sequential(*layers)
    weights = [p for name, p in model.named_parameters() if name.endswith("weight")]
    biases = [p for name, p in model.named_parameters() if name.endswith("bias")]
    groups = [
        {"params": weights, "weight_decay": config.weight_decay},
        {"params": biases, "weight_decay": 0.0},
    ]
    lr = config.learning_rate
    if config.optimizer == "sgd":
        opt = torch.optim.SGD(groups, lr=lr)
    elif config.optimizer in ("momentum", "nesterov"):
        opt = torch.optim.SGD(
            groups, lr=lr, momentum=config.momentum, nesterov=config.optimizer == "nesterov"
        )
    elif config.optimizer == "adam":
        opt = torch.optim.Adam(groups, lr=lr, betas=(config.beta1, config.beta2), eps=config.eps)
    elif config.optimizer == "adamw":
        opt = torch.optim.AdamW(groups, lr=lr, betas=(config.beta1, config.beta2), eps=config.eps)
    elif config.optimizer == "rmsprop":
        # torch's alpha is our rho; eps is added outside the root in both.
        opt = torch.optim.RMSprop(
            groups, lr=lr, alpha=config.rho, eps=config.eps, momentum=0.0, centered=False
        )
    elif config.optimizer == "adagrad":
        # torch's defaults are eps=1e-10 (ours: config.eps) and no lr decay.
        opt = torch.optim.Adagrad(
            groups, lr=lr, lr_decay=0.0, eps=config.eps, initial_accumulator_value=0.0
        )
    else:
        raise AssertionError(config.optimizer)
    if data.task == "multiclass":
        loss_fn = torch.nn.CrossEntropyLoss()
        target = lambda y: torch.from_numpy(y)  # noqa: E731
    elif data.task == "binary":
        loss_fn = torch.nn.BCEWithLogitsLoss()
        target = lambda y: torch.from_numpy(y.astype(np.float32)).reshape(-1, 1)  # noqa: E731
    else:
        loss_fn = torch.nn.MSELoss()
        target = lambda y: torch.from_numpy(y).reshape(-1, 1)  # noqa: E731
    n, batch = len(data.X_train), config.batch_size
    # fit draws input noise, then dropout masks, for blocks of whole batches at a time.
    widths = sum(config.hidden_layers) if config.dropout else 0
    widths += data.n_features if config.input_noise else 0
    block_rows = batch * max(1, NOISE_BLOCK_VALUES // max(1, batch * widths))
    dropout = _Dropout(config.dropout, config.hidden_layers, min(block_rows, n), np.float32)
    train_losses, val_losses = [], []
    for _ in range(epochs):
        perm = rngs.shuffle.permutation(n)
        X_epoch = data.X_train[perm]  # a copy: the noise below leaves data alone
        y_epoch = data.y_train[perm]
        total = 0.0
        for block_start in range(0, n, block_rows):
            block_end = min(n, block_start + block_rows)
            if config.input_noise:
                xb = X_epoch[block_start:block_end]
                xb += config.input_noise * rngs.noise.standard_normal(xb.shape, np.float32)
            if dropout:
                dropout.draw(rngs.noise, block_end - block_start)
            for s in range(block_start, block_end, batch):
                e = min(s + batch, block_end)
                if dropout:
                    masks = dropout.masks(s - block_start, e - block_start)
                    for layer, m in zip(drops, masks, strict=True):
                        layer.mask = torch.from_numpy(np.ascontiguousarray(m.T))
                xs, ys = torch.from_numpy(X_epoch[s:e]), target(y_epoch[s:e])
                total += _torch_step(model, opt, loss_fn, config, weights, xs, ys)
        train_losses.append(total / n)
        for layer in drops:
            layer.mask = None
        with torch.no_grad():
            val = loss_fn(model(torch.from_numpy(data.X_val)), target(data.y_val))
        val_losses.append(val.item())
    return train_losses, val_losses


def _torch_step(model, opt, loss_fn, config, weights, X, y):
    """One optimizer step on a batch; returns the summed data loss of its rows."""
    opt.zero_grad()
    loss = loss_fn(model(X), y)
    total = loss.item() * len(X)
    if config.l2:
        loss = loss + config.l2 * sum((w * w).sum() for w in weights)
    loss.backward()
    if config.grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
    opt.step()
    return total


CASES = [
    ("digits", dict(optimizer="momentum", learning_rate=0.05, weight_decay=1e-3)),
    ("digits", dict(optimizer="nesterov", learning_rate=0.05)),
    ("digits", dict(optimizer="adam", learning_rate=2e-3, weight_decay=1e-3)),
    ("digits", dict(optimizer="adamw", learning_rate=2e-3, weight_decay=1e-2)),
    (
        "mnist1d",
        dict(optimizer="adamw", learning_rate=1e-3, weight_decay=1e-4, hidden_layers=(256, 256)),
    ),
    (
        "digits",
        dict(optimizer="adam", learning_rate=1e-3, l2=1e-3, grad_clip=0.5, activation="tanh"),
    ),
    ("breast_cancer", dict(optimizer="adamw", learning_rate=3e-3, weight_decay=1e-2)),
    ("regression", dict(optimizer="momentum", learning_rate=0.01)),
    ("digits", dict(optimizer="sgd", learning_rate=0.05, weight_decay=1e-3)),
    ("regression", dict(optimizer="sgd", learning_rate=0.01, activation="tanh")),
    ("digits", dict(optimizer="rmsprop", learning_rate=1e-3, rho=0.95, eps=1e-6)),
    ("breast_cancer", dict(optimizer="rmsprop", learning_rate=1e-3, weight_decay=1e-3)),
    ("digits", dict(optimizer="adagrad", learning_rate=0.02, eps=1e-6)),
    ("regression", dict(optimizer="adagrad", learning_rate=0.02, weight_decay=1e-3)),
    ("digits", dict(optimizer="adam", learning_rate=2e-3, dropout=0.3)),
    ("digits", dict(optimizer="momentum", learning_rate=0.02, dropout=0.2, activation="tanh")),
    ("digits", dict(optimizer="sgd", learning_rate=0.05, dropout=0.25, input_noise=0.2)),
    (
        "mnist1d",
        dict(optimizer="adamw", learning_rate=1e-3, hidden_layers=(256, 256), dropout=0.1),
    ),
]


def _case_id(name, overrides):
    extras = [k for k in ("dropout", "input_noise", "activation") if k in overrides]
    return "-".join([name, overrides["optimizer"], *extras])


@pytest.mark.parametrize("name,overrides", CASES, ids=[_case_id(n, o) for n, o in CASES])
def test_losses_match_pytorch(name, overrides):
    data = load_dataset(name, seed=0)
    config = TrainConfig(
        **{
            "hidden_layers": (64, 32),
            "batch_size": 32,
            "max_epochs": EPOCHS,
            "seed": 5,
            **overrides,
        }
    )
    ours = fit(config, data)
    train_ref, val_ref = _torch_run(config, data, EPOCHS)
    np.testing.assert_allclose([h["train_loss"] for h in ours.history], train_ref, rtol=1e-4)
    np.testing.assert_allclose([h["val_loss"] for h in ours.history], val_ref, rtol=1e-4)
