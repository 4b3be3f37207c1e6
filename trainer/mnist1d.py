"""The MNIST-1D generator (Greydanus 2020, "Scaling down deep learning"), offline.

trainer.datasets caches its arrays (mnist1d_arrays) and splits them (load_dataset("mnist1d")).
"""

from __future__ import annotations

import hashlib

import numpy as np

MNIST1D_SEED = 42  # generator seed of the MNIST-1D samples (the split seed is separate)
_MNIST1D_GENERATOR_VERSION = 1  # part of the disk-cache key: bump when the generator changes

# Ten hand-drawn 1-D digit templates.
_MNIST1D_TEMPLATES = (
    (5, 6, 6.5, 6.75, 7, 7, 7, 7, 6.75, 6.5, 6, 5),
    (5, 3, 3, 3.4, 3.8, 4.2, 4.6, 5, 5.4, 5.8, 5, 5),
    (5, 6, 6.5, 6.5, 6, 5.25, 4.75, 4, 3.5, 3.5, 4, 5),
    (5, 6, 6.5, 6.5, 6, 5, 5, 6, 6.5, 6.5, 6, 5),
    (5, 4.4, 3.8, 3.2, 2.6, 2.6, 5, 5, 5, 5, 5, 5),
    (5, 3, 3, 3, 3, 5, 6, 6.5, 6.5, 6, 4.5, 5),
    (5, 4, 3.5, 3.25, 3, 3, 3, 3, 3.25, 3.5, 4, 5),
    (5, 7, 7, 6.6, 6.2, 5.8, 5.4, 5, 4.6, 4.2, 5, 5),
    (5, 4, 3.5, 3.5, 4, 5, 5, 4, 3.5, 3.5, 4, 5),
    (5, 4, 3.5, 3.5, 4, 5, 5, 5, 5, 4.7, 4.3, 5),
)
_MNIST1D_ARGS = {
    "num_samples": 5000,
    "template_len": 12,
    "padding": (36, 60),
    "scale_coeff": 0.4,
    "max_translation": 48,
    "corr_noise_scale": 0.25,
    "iid_noise_scale": 2e-2,
    "shear_scale": 0.75,
    "final_seq_length": 40,
}


def mnist1d_templates() -> np.ndarray:
    """The 10 templates, whitened, starting at 0 and scaled by 1/6 as in the reference."""
    x = np.asarray(_MNIST1D_TEMPLATES, dtype=np.float64)
    x = x - x.mean(axis=1, keepdims=True)
    x = x / x.std(axis=1, keepdims=True)
    x = x - x[:, :1]
    return x / 6.0


def _interpolate(x: np.ndarray, n: int) -> np.ndarray:
    return np.interp(np.linspace(0.0, 1.0, n), np.linspace(0.0, 1.0, len(x)), x)


def _gaussian_filter1d(x: np.ndarray, sigma: float) -> np.ndarray:
    """scipy.ndimage.gaussian_filter1d with its defaults (mode "reflect", truncate 4)."""
    radius = int(4.0 * sigma + 0.5)
    taps = np.arange(-radius, radius + 1)
    kernel = np.exp(-0.5 * (taps / sigma) ** 2)
    kernel /= kernel.sum()
    padded = np.pad(x, radius, mode="symmetric")
    return np.convolve(padded, kernel, mode="valid")



def recipe_digest(seed: int) -> str:
    """Short hash of everything the samples depend on: the disk-cache key's variable part."""
    recipe = repr((_MNIST1D_GENERATOR_VERSION, _MNIST1D_TEMPLATES, sorted(_MNIST1D_ARGS.items()),
                   seed, np.__version__))
    return hashlib.sha256(recipe.encode()).hexdigest()[:16]


def generate_mnist1d(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Generate the 5000 MNIST-1D samples (40 points each) and labels.

    Follows the reference generator: pad with 36-60 zeros, stretch to 72 points, scale,
    circularly translate, fill the background with correlated noise, add iid noise, shear,
    subsample to 40 points; then shuffle rows and standardise globally.
    """
    a = _MNIST1D_ARGS
    rng = np.random.default_rng(seed)
    templates = mnist1d_templates()
    per_class = a["num_samples"] // len(templates)
    length = a["template_len"] + a["padding"][1]
    low, high = a["padding"]
    xs = np.empty((per_class * len(templates), a["final_seq_length"]))
    ys = np.repeat(np.arange(len(templates)), per_class)
    for row, label in enumerate(ys):
        x = templates[label] + 1e-8
        pad = low + int(rng.random() * (high - low + 1))
        x = _interpolate(np.concatenate([x, np.zeros(pad)]), length)
        x = x * (1.0 + a["scale_coeff"] * (rng.random() - 0.5))
        x = np.roll(x, int(rng.integers(a["max_translation"])))
        background = x == 0
        corr = _gaussian_filter1d(a["corr_noise_scale"] * rng.standard_normal(length), 2.0)
        x = np.where(background, corr, x)
        x = x + a["iid_noise_scale"] * rng.standard_normal(length)
        x = x - a["shear_scale"] * (rng.random() - 0.5) * np.linspace(-0.5, 0.5, length)
        xs[row] = _interpolate(x, a["final_seq_length"])
    order = rng.permutation(len(ys))
    xs, ys = xs[order], ys[order]
    xs = (xs - xs.mean()) / xs.std()
    return xs, ys.astype(np.int64)
