"""Cost of the sound certify path: ``Pipeline.certify`` (rounding-error bound of the encoder and the
projection, per-shape Lipschitz constant, exactness flags) against the path it replaced (a plain
float32 encode, the projection, the head's radii divided by one cached constant), same inputs,
same run. Prints both wall times and their ratio; then the same for ``Pipeline.predict``: the
certified arithmetic it runs by default (the float64 pass and the head's exact decision, what the
radii hold for) against its float32 ``arithmetic="fast"`` path.

    python scripts/bench_certify_path.py            # raw pixels (540 inputs) and EfficientNet-Lite0 (64)
    python scripts/bench_certify_path.py --card-inputs 0
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from gmcert.data import load_dataset
from gmcert.pipeline import Pipeline


def old_path(pipeline, X, L):
    """What certify did before: float32 latents treated as exact, one constant for every shape."""
    Z = pipeline.latents(X)
    pred, radius = pipeline.head.certify(Z)
    return pred, radius / L


def best_of(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def compare(name, pipeline, X, repeats):
    L, _ = pipeline.input_lipschitz()
    pipeline.certify(X[:2])  # layer bounds are computed once per input shape: not part of the per-run cost
    old = best_of(lambda: old_path(pipeline, X, L), repeats)
    new = best_of(lambda: pipeline.certify(X), repeats)
    agree = np.mean(np.array([c.prediction for c in pipeline.certify(X)]) == old_path(pipeline, X, L)[0])
    print(f"{name}: {len(X)} inputs, old path {old:.3f} s, sound path {new:.3f} s, ratio {new / old:.2f}x "
          f"(predictions agree on {agree:.1%})")
    fast = best_of(lambda: pipeline.predict(X, arithmetic="fast"), repeats)
    certified = best_of(lambda: pipeline.predict(X), repeats)
    same = np.mean(pipeline.predict(X) == pipeline.predict(X, arithmetic="fast"))
    print(f"{name}: predict, float32 fast {fast:.3f} s, certified arithmetic {certified:.3f} s, "
          f"ratio {certified / fast:.2f}x (labels agree on {same:.1%})")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--card-inputs", type=int, default=64, help="inputs for the EfficientNet-Lite0 pipeline")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    raw = load_dataset("digits", channels=None)
    X, y = raw.images.numpy(), raw.labels
    compare("raw pixels -> PCA 32 -> GM", Pipeline(encoder="identity", n_components=32).fit(X[:1257], y[:1257]),
            X[1257:], args.repeats)
    if args.card_inputs:
        rgb = load_dataset("digits")
        Xc = rgb.images.numpy()
        pipe = Pipeline(cache_dir=None).fit(Xc[:300], rgb.labels[:300])
        compare("digits -> efficientnet_lite0 (224 px) -> PCA 64 -> GM", pipe, Xc[1300:1300 + args.card_inputs],
                max(1, args.repeats - 2))


if __name__ == "__main__":
    main()
