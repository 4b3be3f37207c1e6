"""Same network, same initial weights, same batches: losses match PyTorch's for 2 epochs."""

import numpy as np
import pytest

from trainer import TrainConfig, fit, load_dataset
from trainer.fit import build_network, make_rngs

torch = pytest.importorskip("torch", reason="PyTorch is not installed; reference test skipped")

EPOCHS = 2


def _torch_run(config: TrainConfig, data, epochs: int):
    """Train the same MLP in PyTorch on fit's exact batch order; return per-epoch losses."""
    torch.set_num_threads(1)
    rngs = make_rngs(config.seed)
    net = build_network(config, data, rngs.init)
    acts = {"relu": torch.nn.ReLU, "tanh": torch.nn.Tanh}
    layers = []
    for i, (w, b) in enumerate(net.get_weights()):
        lin = torch.nn.Linear(*w.shape)
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(w.T.copy()))
            lin.bias.copy_(torch.from_numpy(b))
        layers.append(lin)
        if i < len(net.weights) - 1:
            layers.append(acts[config.activation]())
    model = torch.nn.Sequential(*layers)
    weights = [p for name, p in model.named_parameters() if name.endswith("weight")]
    biases = [p for name, p in model.named_parameters() if name.endswith("bias")]
    groups = [
        {"params": weights, "weight_decay": config.weight_decay},
        {"params": biases, "weight_decay": 0.0},
    ]
    lr = config.learning_rate
    if config.optimizer in ("momentum", "nesterov"):
        opt = torch.optim.SGD(
            groups, lr=lr, momentum=config.momentum, nesterov=config.optimizer == "nesterov"
        )
    elif config.optimizer == "adam":
        opt = torch.optim.Adam(groups, lr=lr, betas=(config.beta1, config.beta2), eps=config.eps)
    elif config.optimizer == "adamw":
        opt = torch.optim.AdamW(groups, lr=lr, betas=(config.beta1, config.beta2), eps=config.eps)
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
    X = torch.from_numpy(data.X_train)
    n = len(X)
    train_losses, val_losses = [], []
    for _ in range(epochs):
        perm = rngs.shuffle.permutation(n)
        total = 0.0
        for s in range(0, n, config.batch_size):
            idx = perm[s : s + config.batch_size]
            opt.zero_grad()
            loss = loss_fn(model(X[idx]), target(data.y_train[idx]))
            total += loss.item() * len(idx)
            if config.l2:
                loss = loss + config.l2 * sum((w * w).sum() for w in weights)
            loss.backward()
            if config.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            opt.step()
        train_losses.append(total / n)
        with torch.no_grad():
            val = loss_fn(model(torch.from_numpy(data.X_val)), target(data.y_val))
        val_losses.append(val.item())
    return train_losses, val_losses


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
]


@pytest.mark.parametrize("name,overrides", CASES, ids=[f"{n}-{o['optimizer']}" for n, o in CASES])
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
