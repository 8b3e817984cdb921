"""``gmcert train``: its options and its command (the CLI layer of the train concept; ``gmcert.cli``
registers them). No logic the Python API (:func:`gmcert.train.train_model`) lacks."""
from __future__ import annotations

import sys

import numpy as np

from gmcert.data.sources import DATA_HELP, DATA_ROOT_HELP
from gmcert.errors import DataError
from gmcert.inputs import load_inputs

RADII = (0.0, 0.1, 0.25, 0.5, 0.75, 1.0)


def add_train_args(sub, default_out: str):
    train = sub.add_parser("train", help="train a noise-robust base (Gaussian, consistency, CRT) and fit its head",
                           description="Train an encoder under Gaussian noise, refit the Gaussian-mixture head on noisy "
                                       "latents, and write a gmcert model directory (certify/compare/diagnose read it).")
    train.add_argument("--data", default="digits", help=DATA_HELP)
    train.add_argument("--data-root", default=None, help=DATA_ROOT_HELP)
    train.add_argument("--student", choices=["standard", "lipschitz"], default="standard",
                       help="lipschitz: a 1-Lipschitz network (orthogonal layers) trained by the margin method, "
                            "whose closed-form certificates are sound and useful from one pass")
    train.add_argument("--encoder", default=None,
                       help="card name (default gmcert_cnn, a small CNN for small images; for --student lipschitz "
                            "gmcert_lipnet up to 8x8 px, gmcert_lipconv above; efficientnet_lite0, ...), .toml path "
                            "or timm:<model>")
    train.add_argument("--arch", default=None, help="the base architecture, an alias of --encoder: lenet (LeNet-5, "
                                                    "the published Fashion-MNIST rows' base), gmcert_cnn, ...")
    train.add_argument("--width", type=int, default=None,
                       help="a conv student's channels in its first stage (even; small 16, medium 32)")
    train.add_argument("--depth", type=int, default=None, help="a conv student's convs per stage (default 2)")
    train.add_argument("--input-size", type=int, default=None,
                       help="pixels the encoder works at (default: the data's own size for gmcert's networks; "
                            "a pretrained card's size, at most 4x the data's; any resize is printed with its norm)")
    train.add_argument("--sigma", type=float, default=0.25, help="Gaussian noise to train (and certify) with")
    train.add_argument("--method", choices=["gaussian", "consistency", "crt", "margin"], default=None,
                       help="default gaussian (margin for --student lipschitz)")
    train.add_argument("--teacher", default=None, help="crt: a gmcert model directory with the same classes; "
                                                       "margin: a gmcert model whose latents are distilled")
    train.add_argument("--margin", type=float, default=0.75, help="margin: the target latent radius (default 0.75)")
    train.add_argument("--distill-weight", type=float, default=1.0, help="margin: weight of latent distillation")
    train.add_argument("--shape-latents", action="store_true", help="add the latent-shaping penalty")
    train.add_argument("--shape-weight", type=float, default=1.0)
    train.add_argument("--copies", type=int, default=2, help="consistency: noisy copies per input (m)")
    train.add_argument("--consistency-weight", type=float, default=10.0, help="consistency: lambda")
    train.add_argument("--crt-weight", type=float, default=1.0, help="crt: w of the logit distance (1 - w: CE)")
    train.add_argument("--epochs", type=int, default=None, help="default 30; --student lipschitz: 100 for the MLP (8x8 px), 8 for the conv student")
    train.add_argument("--max-steps", type=int, default=None,
                       help="stop after this many optimizer steps (the cosine schedule ends there)")
    train.add_argument("--time-budget", type=float, default=None,
                       help="stop after this many seconds of training (the schedule follows the clock)")
    train.add_argument("--batch-size", type=int, default=64)
    train.add_argument("--lr", type=float, default=3e-3,
                       help="AdamW learning rate, cosine decay (default 3e-3; fine-tuning a pretrained encoder wants less)")
    train.add_argument("--head-copies", type=int, default=4, help="noisy copies per image for the head's refit")
    train.add_argument("--dim", type=int, default=64, help="PCA dimension of the head (default 64)")
    train.add_argument("--test-size", type=float, default=0.25, help="held-out fraction (default 0.25)")
    train.add_argument("--no-pretrained", action="store_true", help="start from random weights")
    train.add_argument("--amp", action="store_true", help="bfloat16 mixed precision on CUDA")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--limit", type=int, default=None, help="use only the first N inputs")
    train.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    train.add_argument("--out", default=default_out, help=f"model directory (default {default_out})")


def cmd_train(args) -> int:
    from gmcert.encoders.resizing import describe_resize
    from gmcert.train import TrainConfig, train_model

    lipschitz = args.student == "lipschitz"
    if args.arch is not None:
        if args.encoder is not None and args.encoder != args.arch:
            raise DataError(f"--arch {args.arch} and --encoder {args.encoder} name two bases; give one")
        args.encoder = args.arch
    args.method = args.method or ("margin" if lipschitz else "gaussian")
    args.encoder = args.encoder or (None if lipschitz else "gmcert_cnn")  # lipschitz: train_model picks by image size
    args.epochs = args.epochs or _default_epochs(args, lipschitz)
    config = TrainConfig(method=args.method, sigma=args.sigma, student=args.student, margin=args.margin,
                         distill_weight=args.distill_weight, epochs=args.epochs, batch_size=args.batch_size,
                         lr=args.lr, copies=args.copies, consistency_weight=args.consistency_weight,
                         crt_weight=args.crt_weight, shape_latents=args.shape_latents, shape_weight=args.shape_weight,
                         head_copies=args.head_copies, seed=args.seed, amp=args.amp, max_steps=args.max_steps,
                         time_budget=args.time_budget)
    print(f"training {args.encoder or 'a Lipschitz student'} on {args.data} by {args.method}"
          f"{'' if lipschitz else f' at sigma={args.sigma}'}"
          f"{' with latent shaping' if args.shape_latents else ''} for {args.epochs} epochs"
          f"{f', at most {args.max_steps} steps' if args.max_steps else ''}"
          f"{f', at most {args.time_budget:g} s' if args.time_budget else ''}", file=sys.stderr)
    pipeline, record = train_model(args.out, data=args.data, encoder=args.encoder, input_size=args.input_size,
                                   config=config, teacher=args.teacher, pretrained=False if args.no_pretrained else None,
                                   n_components=args.dim, test_size=args.test_size, device=args.device,
                                   limit=args.limit, data_root=args.data_root,
                                   model_args={k: v for k, v in (("width", args.width), ("depth", args.depth))
                                               if v is not None})
    if pipeline is None:  # a rank other than 0 of a torchrun job: rank 0 reports
        return 0
    last, network, head = record["history"][-1], record["network"], record["head"]
    compute = record["compute"]
    print(f"saved model to {args.out} ({pipeline.encoder.card.name}, input size "
          f"{pipeline.encoder.card.input_size[1]} px, {pipeline.n_components}-dim Gaussian-mixture head)")
    print(describe_resize(record["resize"], pipeline.input_shape_[1:]))
    print(f"training: {record['epochs_done']} epochs on {record['train_rows']} rows, {compute['seconds']:.1f} s "
          f"({compute['seconds'] / record['epochs_done']:.2f} s/epoch), final loss {last['loss']:.4f}")
    if network is None:
        print("no held-out split (--test-size 0): every row trained; measure the model with "
              "`gmcert certify --data` on other data")
        if lipschitz:
            L, kind = pipeline.input_lipschitz()
            print(f"input Lipschitz constant: {L:.9g} ({kind}, from the stored weights)")
        return 0
    print(f"held-out accuracy, network:          clean {network['clean_accuracy']:.4f}   "
          f"under noise sigma={args.sigma}: {network['noisy_accuracy']:.4f}")
    if head:
        print(f"held-out accuracy, Gaussian mixture: clean {head['clean_accuracy']:.4f}   "
              f"under noise sigma={args.sigma}: {head['noisy_accuracy']:.4f}")
    if lipschitz:
        _print_lipschitz_certificates(pipeline)
    print(f"next: gmcert compare --model {args.out} --sigma {args.sigma}")
    return 0


#: epochs of the conv student by default: about 700 steps an epoch on Fashion-MNIST's 45,000
#: training rows at 0.1 to 0.2 s a step on 2 cores, so 8 epochs take 10 to 20 minutes (within 30)
CONV_STUDENT_EPOCHS = 8


def _default_epochs(args, lipschitz: bool) -> int:
    """30 for a noise-trained base; for a Lipschitz student 100 (the MLP on images of at most 8x8
    px) or ``CONV_STUDENT_EPOCHS`` (the conv student, which costs about 100x more a step)."""
    if not lipschitz:
        return 30
    encoder = args.encoder
    if encoder is None:  # train_model's own choice, by the images' size
        size = max(load_inputs({"data": args.data}, channels=1, limit=1, root=args.data_root).x.shape[2:])
        encoder = "gmcert_lipnet" if size <= 8 else "gmcert_lipconv"
    return 100 if "lipnet" in str(encoder) else CONV_STUDENT_EPOCHS


def _print_lipschitz_certificates(pipeline):
    """The closed form's one-pass, sound certified accuracy on the held-out split."""
    from gmcert.report import certificate_row, summarize

    L, kind = pipeline.input_lipschitz()
    test = np.asarray(pipeline.metadata["test_index"], dtype=np.int64)
    held = load_inputs({"data": pipeline.metadata["data"]}, pipeline.metadata["channels"]).subset(test)
    certs = pipeline.certify(held.x)
    summary = summarize([certificate_row(i, y, c) for i, y, c in zip(test, held.labels, certs)], RADII)
    print(f"input Lipschitz constant: {L:.9g} ({kind}, from the stored weights)")
    print("held-out certified accuracy of the closed form (one pass, sound): " + ", ".join(
        f"r={r:g}: {a:.3f}" for r, a in zip(RADII, summary["certified_accuracy"])))
