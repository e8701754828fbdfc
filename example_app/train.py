"""A small training run: linear regression fitted by mini-batch SGD on synthetic data.

Try it:  python example_app/train.py -m hydra/launcher=hsm_distributed lr=0.1,0.01,0.001
Returns the final validation loss, so sweepers (e.g. Optuna) can minimise it.
"""

from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

log = logging.getLogger(__name__)


def make_data(n: int, features: int, noise: float, rng: random.Random) -> list[tuple[list[float], float]]:
    true_weights = [rng.uniform(-2, 2) for _ in range(features)]
    rows = []
    for _ in range(n):
        x = [rng.gauss(0, 1) for _ in range(features)]
        y = sum(w * xi for w, xi in zip(true_weights, x, strict=True)) + rng.gauss(0, noise)
        rows.append((x, y))
    return rows


def mse(weights: list[float], rows: list[tuple[list[float], float]]) -> float:
    return sum((sum(w * xi for w, xi in zip(weights, x, strict=True)) - y) ** 2 for x, y in rows) / len(rows)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def train(cfg: DictConfig) -> float:
    rng = random.Random(cfg.seed)
    rows = make_data(cfg.data.samples, cfg.data.features, cfg.data.noise, rng)
    split = int(len(rows) * 0.8)
    train_rows, val_rows = rows[:split], rows[split:]
    weights = [0.0] * cfg.data.features
    started = time.perf_counter()
    for epoch in range(1, cfg.epochs + 1):
        rng.shuffle(train_rows)
        for start in range(0, len(train_rows), cfg.batch_size):
            batch = train_rows[start : start + cfg.batch_size]
            grads = [0.0] * len(weights)
            for x, y in batch:
                error = sum(w * xi for w, xi in zip(weights, x, strict=True)) - y
                for i, xi in enumerate(x):
                    grads[i] += 2 * error * xi / len(batch)
            weights = [w - cfg.lr * g for w, g in zip(weights, grads, strict=True)]
        log.info("epoch %d: train loss %.4f, val loss %.4f", epoch, mse(weights, train_rows), mse(weights, val_rows))
    val_loss = mse(weights, val_rows)
    output_dir = Path(HydraConfig.get().runtime.output_dir)
    metrics = {"lr": cfg.lr, "val_loss": val_loss, "seconds": time.perf_counter() - started}
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    log.info("lr=%s: final val loss %.4f (metrics in %s)", cfg.lr, val_loss, output_dir / "metrics.json")
    return val_loss


if __name__ == "__main__":
    train()
