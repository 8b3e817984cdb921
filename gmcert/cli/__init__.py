"""The ``gmcert`` command: parse, call the library, print. No logic the Python API lacks.

One module per command group: :mod:`gmcert.cli.certify`, :mod:`gmcert.cli.commands` (fit, diagnose,
compare), :mod:`gmcert.train.command`; shared pieces in :mod:`gmcert.cli.common`."""
from __future__ import annotations

import argparse
import sys

from gmcert.cli.certify import cmd_certify
from gmcert.cli.commands import cmd_compare, cmd_diagnose, cmd_fit
from gmcert.cli.common import (DEFAULT_MODEL, DEFAULT_RADII, DEFAULT_TRAINED, _add_data_args, _Parser, _radii,
                               _shrinkage)
from gmcert.errors import GmcertError
from gmcert.inputs import check_arguments
from gmcert.train.command import add_train_args, cmd_train


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="gmcert", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    fit = sub.add_parser("fit", help="fit encoder + projection + Gaussian-mixture head",
                         description="With no data argument: digits -> efficientnet_lite0 -> PCA(64) -> full "
                                     "covariance with Ledoit-Wolf shrinkage, evaluated on a held-out split.")
    _add_data_args(fit, "npz with z (n, d) and y (n,): fit the head on these latents directly")
    fit.add_argument("--out", default=DEFAULT_MODEL, help=f"model directory (default {DEFAULT_MODEL})")
    fit.add_argument("--encoder", default=None,
                     help="encoder card, timm:<model>, or 'identity' for raw pixels (default efficientnet_lite0)")
    fit.add_argument("--no-pretrained", action="store_true", help="random-init encoder (for tests)")
    fit.add_argument("--projection", choices=["pca", "none"], default=None,
                     help="default pca for images, none for --latents")
    fit.add_argument("--dim", type=int, default=64, help="PCA dimension (default 64)")
    fit.add_argument("--covariance-type", default="full", choices=["full", "tied", "diag", "spherical"])
    fit.add_argument("--shrinkage", type=_shrinkage, default="ledoit_wolf")
    fit.add_argument("--reg-covar", type=float, default=1e-6)
    fit.add_argument("--components-per-class", type=int, default=1)
    fit.add_argument("--select", action="store_true",
                     help="choose covariance type, shrinkage and components per class (overriding those options) "
                          "by 5-fold held-out likelihood on the training split; prints the table, records it")
    fit.add_argument("--test-size", type=float, default=0.25,
                     help="held-out fraction for the printed evaluation (0 = fit on everything)")
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument("--noise-sigma", type=float, default=0.0,
                     help="also fit on Gaussian-noised copies (pixel-space sigma): a better base for smoothing")
    fit.add_argument("--noise-copies", type=int, default=1, help="noised copies per input (default 1)")
    fit.add_argument("--batch-size", type=int, default=64)
    fit.add_argument("--radii", type=_radii, default=_radii(DEFAULT_RADII))

    cert = sub.add_parser("certify", help="certify inputs; writes Cohen-format TSV + JSON summary")
    _add_data_args(cert, "npz with z (n, d) and y (n,) (models fitted with --latents)")
    cert.add_argument("--model", default=DEFAULT_MODEL)
    cert.add_argument("--out", default=None, help="TSV path (default <model>/certify.tsv)")
    cert.add_argument("--method", choices=["exact", "closed_form", "smoothing"], default="exact",
                      help="closed form (exact: the dual solver; closed_form: the fast bound) or smoothing only "
                           "(Cohen's CERTIFY at --n, for encoders the closed form cannot serve, such as DEQs)")
    cert.add_argument("--lipschitz", choices=["auto", "bound", "estimate"], default="auto",
                      help="input-radius kind for deep encoders: sound 'bound' (default) or a CLEVER 'estimate'")
    cert.add_argument("--radii", type=_radii, default=_radii(DEFAULT_RADII))
    _add_fallback_args(cert)
    cert.add_argument("--n0", type=int, default=100, help="--method smoothing: selection draws (default 100)")
    # not "--n": torchrun's own parser takes "--n" for a prefix of its --nnodes / --nproc-per-node
    cert.add_argument("--n-samples", type=int, default=10_000,
                      help="--method smoothing: Cohen's n, the counted draws (default 10000)")
    cert.add_argument("--serialized", action="store_true",
                      help="--method smoothing of a DEQ: draw the counted samples by serialized smoothing (SRS)")
    cert.add_argument("--verify", action="store_true",
                      help="--serialized, contractive DEQ (gmcert_cdeq): prove each warm answer equal to the "
                           "standard DEQ's (or solve it cold): Cohen's exact count, no audit")
    cert.add_argument("--steps", type=int, default=None,
                      help="--serialized: solver steps per warm solve (default 3; with --verify the most tried "
                           "before a cold solve, default 6)")
    cert.add_argument("--warmup-interval", type=int, default=None,
                      help="--serialized: a cold batch every this many (default 10; with --verify none)")
    cert.add_argument("--audit-size", type=int, default=None,
                      help="--serialized: chain samples re-solved cold (default 1000; --verify has no audit)")

    diag = sub.add_parser("diagnose", help="measure how far the latents are from the fitted mixture")
    _add_data_args(diag, "npz with z (n, d) and y (n,)")
    diag.add_argument("--model", default=DEFAULT_MODEL)
    diag.add_argument("--out", default=None, help="output directory (default: the model directory)")
    diag.add_argument("--k", type=int, default=10, help="k of the k-NN entropy estimator (default 10)")
    diag.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples for the intervals")
    diag.add_argument("--q-samples", type=int, default=20000, help="samples from the mixture for CertAcc_Q")
    diag.add_argument("--seed", type=int, default=0)

    add_train_args(sub, DEFAULT_TRAINED)
    comp = sub.add_parser("compare", help="closed form vs smoothing baselines on the same inputs")
    _add_data_args(comp, "npz with z (n, d) and y (n,)")
    comp.add_argument("--model", default=DEFAULT_MODEL)
    comp.add_argument("--out", default=None, help="output directory (default <model>/compare)")
    comp.add_argument("--methods", default="gm-exact,cohen,sequential",
                      help="comma-separated: gm-exact, gm-closed, cohen, sequential, srs (a DEQ), srs-verified "
                           "(a contractive DEQ)")
    comp.add_argument("--sigma", type=float, default=0.25)
    comp.add_argument("--alpha", type=float, default=0.001)
    comp.add_argument("--radii", type=_radii, default=None, help="radius grid (default 0..2 sigma)")
    comp.add_argument("--cohen-n", default="200",
                      help="Cohen's n values, e.g. 1e3,1e4,1e5 (default 200: minutes on 2 CPU cores)")
    comp.add_argument("--n0", type=int, default=32, help="Cohen's selection draws (default 32)")
    comp.add_argument("--max-samples", type=int, default=300, help="sequential smoother budget per input (default 300)")
    comp.add_argument("--radius-tol", type=float, default=0.03,
                      help="sequential: stop once the radius is within this many sigma of what fixed-n CERTIFY "
                           "with --max-samples draws would give (default 0.03)")
    comp.add_argument("--n-inputs", type=int, default=6, help="held-out inputs to certify (default 6)")
    comp.add_argument("--estimate", action="store_true", help="also show CLEVER-estimated GM radii (not sound)")
    comp.add_argument("--srs", default="1,3", metavar="STEPS",
                      help="method srs (serialized smoothing of a DEQ, at each Cohen n): solver steps per warm solve")
    comp.add_argument("--warmup-interval", type=int, default=10,
                      help="srs: a cold batch every this many (srs-verified: none)")
    comp.add_argument("--audit-size", type=int, default=1000, help="srs: chain samples re-solved cold")
    comp.add_argument("--smoothing-model", default=None,
                      help="smooth this model (e.g. a noise-trained base) on the same inputs, beside --model's "
                           "closed form")
    comp.add_argument("--seed", type=int, default=0)
    return parser


def _add_fallback_args(p):
    p.add_argument("--fallback", choices=["none", "smoothing"], default="none",
                   help="certify by randomized smoothing where the closed form cannot serve")
    p.add_argument("--target-radius", type=float, default=None,
                   help="input radius each input needs; below it (or with an unsound kind) the input falls back")
    p.add_argument("--mismatch-threshold", type=float, default=None,
                   help="fall back when the predicted class's estimated KL to its Gaussian exceeds this")
    p.add_argument("--route-threshold", type=float, default=None,
                   help="tau: the closed form serves inputs whose sound radius exceeds it (default: the target)")
    p.add_argument("--calibrate", type=int, default=0, metavar="N",
                   help="choose tau for the best certified accuracy at the target on N training-split inputs")
    p.add_argument("--sigma", type=float, default=0.25, help="smoothing noise level in pixel space")
    p.add_argument("--alpha", type=float, default=0.001, help="smoothing failure probability")
    p.add_argument("--max-samples", type=int, default=100_000, help="smoothing budget per input")
    p.add_argument("--seed", type=int, default=0)


# -- commands ---------------------------------------------------------------------------------


def main(argv=None) -> int:
    """Run one command; under torchrun every rank runs it (:mod:`gmcert.distributed`). Errors: one
    line on stderr (rank 0's; other ranks name themselves) and exit 2."""
    from gmcert.distributed import world

    parser = build_parser()
    args = parser.parse_args(argv)
    commands = {"fit": cmd_fit, "certify": cmd_certify, "diagnose": cmd_diagnose, "compare": cmd_compare,
                "train": cmd_train}
    who = f"gmcert {args.command}"
    try:
        check_arguments(args)
        with world(getattr(args, "device", None)) as w:
            if w.active:
                who = f"gmcert {args.command}" + (f" (rank {w.rank})" if not w.main else "")
                if hasattr(args, "device"):
                    args.device = w.device
            return commands[args.command](args)
    except GmcertError as err:
        message = "; ".join(line.strip() for line in str(err).splitlines() if line.strip())
        print(f"{who}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{who}: interrupted; partial results (if any) are kept for resuming", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())


if __name__ == "__main__":
    sys.exit(main())
