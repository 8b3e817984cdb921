"""Throughput of gmcert.encoders.encoding.encode against a plain ``model(x)`` loop, same module, same tensors.

Both sides run the same encoder module (resize to the card's size + normalisation + network) on
the same images with the same batch size, cache off; rounds alternate so that machine load
affects both alike, and the best round of each is compared. Target: overhead <= 10%.

    python scripts/bench_encode.py [--encoder efficientnet_lite0] [--n 256] [--batch-size 32] [--rounds 2]
"""
import argparse
import time

import torch

from gmcert.data import load_dataset
from gmcert.encoders.cards import load_encoder
from gmcert.encoders.encoding import default_device, encode


def plain_loop(model, images, batch_size, device):
    outputs = []
    with torch.inference_mode():
        for start in range(0, images.shape[0], batch_size):
            outputs.append(model(images[start:start + batch_size].to(device)).cpu())
    return torch.cat(outputs)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", default="efficientnet_lite0")
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    device = default_device()
    model = load_encoder(args.encoder, device=device)
    images = load_dataset("digits").images[:args.n]
    print(f"encoder {args.encoder} (input {model.card.input_size}), {images.shape[0]} digits images "
          f"{tuple(images.shape[1:])}, batch {args.batch_size}, device {device}, "
          f"torch threads {torch.get_num_threads()}")
    plain_loop(model, images[:args.batch_size], args.batch_size, device)  # warm-up

    best = {"gmcert encode": float("inf"), "plain model(x) loop": float("inf")}
    for _ in range(args.rounds):
        start = time.perf_counter()
        latents = encode(model, images, batch_size=args.batch_size, device=device, progress=False)
        best["gmcert encode"] = min(best["gmcert encode"], time.perf_counter() - start)
        start = time.perf_counter()
        reference = plain_loop(model, images, args.batch_size, device)
        best["plain model(x) loop"] = min(best["plain model(x) loop"], time.perf_counter() - start)
    if not torch.allclose(torch.from_numpy(latents), reference, rtol=1e-4, atol=1e-5):
        raise SystemExit("encode and the plain loop disagree")
    for name, seconds in best.items():
        print(f"{name:>20}: {images.shape[0] / seconds:8.2f} images/s ({seconds:.2f} s, best of {args.rounds})")
    ratio = best["gmcert encode"] / best["plain model(x) loop"]
    print(f"time ratio gmcert/plain = {ratio:.3f} (overhead {100 * (ratio - 1):+.1f}%, target <= +10%)")


if __name__ == "__main__":
    main()
