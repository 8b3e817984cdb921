"""The ``gmcert`` command: parse, call the library, print. No logic the Python API lacks."""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np

from gmcert.atomic import check_file_target, check_folder_target
from gmcert.errors import DataError, GmcertError
from gmcert.inputs import check_arguments, fit_split, load_inputs, load_model, model_inputs
from gmcert.train.command import add_train_args, cmd_train

DEFAULT_MODEL = "runs/default"
DEFAULT_TRAINED = "runs/trained"
DEFAULT_RADII = "0,0.05,0.1,0.25,0.5,0.75,1,1.5,2"
DEFAULT_CACHE = str(Path("~/.cache/gmcert/latents").expanduser())
#: what a certify TSV's rows depend on: a resumed run (or another rank) must share them
CERTIFY_SETTINGS = ("method", "lipschitz", "fallback", "target_radius", "mismatch_threshold", "route_threshold",
                    "calibrate", "sigma", "alpha", "max_samples", "seed", "n0", "n_samples", "serialized", "steps",
                    "warmup_interval", "audit_size", "data", "latents")


def _radii(text: str) -> list[float]:
    try:
        radii = [float(r) for r in text.split(",") if r.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"radii must be comma-separated numbers: {err}") from None
    if not radii or any(not np.isfinite(r) or r < 0 for r in radii):
        raise argparse.ArgumentTypeError(f"radii must be finite and >= 0, got {text!r}")
    return radii


def _shrinkage(text: str):
    if text in ("ledoit_wolf", "oas"):
        return text
    if text == "none":
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"shrinkage must be ledoit_wolf, oas, none or a float in [0, 1], got {text!r}")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line, like gmcert's own, and the same exit code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _add_data_args(p, latents_help):
    group = p.add_mutually_exclusive_group()
    group.add_argument("--latents", help=latents_help)
    group.add_argument("--data", help="digits | cifar10[:train|:test] | ImageFolder dir | .npy/.npz images")
    p.add_argument("--download", action="store_true", help="allow downloading CIFAR-10 via torchvision")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--cache-dir", default=DEFAULT_CACHE, help="latent cache directory ('' to disable)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N inputs")


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
    cert.add_argument("--steps", type=int, default=3, help="--serialized: solver steps per warm solve (default 3)")
    cert.add_argument("--warmup-interval", type=int, default=10, help="--serialized: a cold batch every this many")
    cert.add_argument("--audit-size", type=int, default=1000, help="--serialized: chain samples re-solved cold")

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
                      help="comma-separated: gm-exact, gm-closed, cohen, sequential")
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
    comp.add_argument("--warmup-interval", type=int, default=10, help="srs: a cold batch every this many")
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
def cmd_fit(args) -> int:
    from gmcert.latent.mixture import GaussianMixtureClassifier
    from gmcert.pipeline import LINEAR_ENCODERS, Pipeline

    if args.latents:
        encoder, projection, data = "none", args.projection or "none", {"latents": str(Path(args.latents).resolve())}
    else:
        encoder, projection = args.encoder or "efficientnet_lite0", args.projection or "pca"
        data = {"data": args.data or "digits"}
    # Everything is checked, fitted and evaluated before the model directory is written.
    check_folder_target(args.out, "--out", owner_file="pipeline.json")
    inputs = load_inputs(data, channels=_encoder_channels(encoder), download=args.download, limit=args.limit)
    train, test = fit_split(inputs.labels, args.test_size, args.seed, args.components_per_class)
    if projection == "pca" and encoder in LINEAR_ENCODERS:
        samples = len(train) * (1 + (args.noise_copies if args.noise_sigma > 0 else 0))
        available = min(samples, int(np.prod(inputs.x.shape[1:])))
        if args.dim > available:
            raise DataError(f"--dim {args.dim} exceeds what PCA can give here: min(training samples, features) "
                            f"= {available}")
    head = GaussianMixtureClassifier(covariance_type=args.covariance_type, shrinkage=args.shrinkage,
                                     reg_covar=args.reg_covar, n_components_per_class=args.components_per_class,
                                     random_state=args.seed)
    pipeline = Pipeline(encoder=encoder, projection=projection, n_components=args.dim, head=head,
                        pretrained=not args.no_pretrained, batch_size=args.batch_size, device=args.device,
                        cache_dir=args.cache_dir or None)
    if encoder not in LINEAR_ENCODERS:
        _ = pipeline.encoder  # an unknown card or missing weights fail here, before any work
    dim = f"({args.dim})" if projection == "pca" else ""
    print(f"fitting {encoder} -> {projection}{dim} -> {args.covariance_type} Gaussian mixture "
          f"on {len(train)} inputs", file=sys.stderr)
    fit_inputs = inputs.subset(train)
    from gmcert.distributed import agree, current

    agree({k: v for k, v in vars(args).items() if k not in ("device", "cache_dir")}, "the fit settings")
    pipeline.fit(fit_inputs.x, fit_inputs.labels, dataset_identity=fit_inputs.identity,
                 noise_sigma=args.noise_sigma, noise_copies=args.noise_copies, random_state=args.seed, distributed=True)
    if not current().main:  # under torchrun the ranks encoded their shares; rank 0 evaluates and saves
        return 0
    pipeline.metadata = {**data, "channels": inputs.channels, "test_index": test.tolist(), "seed": args.seed,
                         "noise_sigma": args.noise_sigma, "noise_copies": args.noise_copies}
    L, kind = pipeline.input_lipschitz()
    if len(test):
        from gmcert.report import certificate_row, certified_accuracy, summarize

        held_out = inputs.subset(test)
        certs = pipeline.certify(held_out.x, dataset_identity=held_out.identity)
        rows = [certificate_row(i, label, c) for i, label, c in zip(test, held_out.labels, certs)]
        summary = summarize(rows, args.radii)
        latent_acc = certified_accuracy([{**row, "radius": c.latent_radius} for row, c in zip(rows, certs)],
                                        args.radii)
    pipeline.save(args.out)
    print(f"saved model to {args.out}")
    if len(test):
        print(f"held-out accuracy: {summary['clean_accuracy']:.4f} ({len(test)} inputs)")
        print(f"input Lipschitz constant: {L:.4g} ({kind})")
        print(_accuracy_table(args.radii, latent_acc, summary["certified_accuracy"], kind))
        if kind == "bound":
            print("input radii of kind 'bound' are sound but vacuous for a deep encoder (a product of layer norms);\n"
                  "for usable input-space certificates run `gmcert certify --fallback smoothing`, or "
                  "`--lipschitz estimate` for labelled, unsound estimates")
    return 0


def _encoder_channels(encoder: str):
    """The channels an encoder takes: its card's (gmcert_cnn: 1), none to convert for raw pixels."""
    if encoder in ("identity", "none"):
        return None
    from gmcert.encoders.cards import load_card

    return load_card(encoder).input_size[0]


def cmd_certify(args) -> int:
    from tqdm import tqdm

    from gmcert.report import CertifyWriter, certificate_row, certified_accuracy, summarize, write_json_atomic

    pipeline = load_model(args.model, device=args.device, cache_dir=args.cache_dir or None)
    if args.fallback != "none":
        args.policy = _fallback_policy(args)
    inputs, index = model_inputs(args, pipeline, "test")
    if args.method == "smoothing" and args.fallback != "none":
        raise DataError("--method smoothing certifies every input by smoothing: it takes no --fallback")
    if args.serialized and args.method != "smoothing":
        raise DataError("--serialized draws smoothing samples: use it with --method smoothing")
    if args.calibrate and args.fallback == "none":
        raise DataError("--calibrate chooses the routing threshold of --fallback smoothing")
    out = Path(args.out) if args.out else Path(args.model) / "certify.tsv"
    if out.suffix == ".json":
        raise DataError(f"--out {out}: the JSON summary goes beside the TSV as {out.stem}.json; name the TSV "
                        "something else")
    for path in (out, out.with_suffix(".json"), out.with_name(out.name + ".partial")):
        check_file_target(path, "--out")
    if args.calibrate:
        _calibrate_route_threshold(args, pipeline)
    from gmcert.distributed import agree, current, shard
    from gmcert.distributed.rows import ShardedRows, model_digest

    w = current()
    settings = {**{k: getattr(args, k) for k in CERTIFY_SETTINGS}, "model": model_digest(args.model)}
    agree(settings, "the certify settings and model")
    # every rank appends to its own partial; rows already in any partial are skipped; nothing is
    # created before the first row
    writer = ShardedRows(out, settings)
    todo = np.array([i for i, idx in enumerate(index) if int(idx) not in writer.done], dtype=np.int64)
    if len(todo) < len(index) and w.main:
        print(f"resuming: {len(index) - len(todo)} of {len(index)} inputs already in {out}'s partial files",
              file=sys.stderr)
    one_by_one = args.fallback != "none" or args.method == "smoothing"
    todo = shard(todo, w, block=1 if args.method == "smoothing" else pipeline.batch_size)
    part = inputs.subset(todo)
    # one bar per running job: the closed form shows its encoder pass's bar; rows that arrive one by
    # one (smoothing) show this one; neither for a moment's work; rank 0's share only
    with tqdm(total=len(todo), desc="certify", unit="input", disable=len(todo) < 2 or not one_by_one or not w.main,
              delay=2) as bar:
        certs = _certify(args, pipeline, part, index[todo]) if len(todo) else []  # a rank may have no share
        for i, label, cert in zip(index[todo], part.labels, certs):
            writer.write(certificate_row(i, label, cert))
            bar.update(1)
    rows = writer.close()
    if not w.main:
        return 0
    summary = summarize(rows, args.radii)
    summary["latent_certified_accuracy"] = certified_accuracy(
        [{**r, "radius": r["latent_radius"] if r["path"] == "closed_form" else 0.0} for r in rows],
        args.radii).tolist()
    summary["config"] = {k: v for k, v in vars(args).items() if k != "policy"}
    if args.fallback != "none":
        from dataclasses import asdict

        summary["fallback_policy"] = asdict(args.policy)
    write_json_atomic(out.with_suffix(".json"), summary)
    kinds = ", ".join(f"{n} {k}" for k, n in summary["rows_by_radius_kind"].items())
    print(f"wrote {out} and {out.with_suffix('.json')} ({len(rows)} inputs; radius kinds: {kinds})")
    print(f"clean accuracy: {summary['clean_accuracy']:.4f}   average certified radius: "
          f"{summary['average_certified_radius']:.4g}")
    print(_accuracy_table(args.radii, None if args.method == "smoothing" else summary["latent_certified_accuracy"],
                          summary["certified_accuracy"],
                          "/".join(summary["rows_by_radius_kind"])))
    return 0


def _certify(args, pipeline, inputs, seeds):
    """Certificates in input order; smoothing ones arrive one by one, so rows are written as they come."""
    if args.method == "smoothing":
        from gmcert.hybrid import iter_certify_smoothing

        serialized = {"steps": args.steps, "warmup_interval": args.warmup_interval,
                      "audit_size": args.audit_size} if args.serialized else None
        return iter_certify_smoothing(pipeline, inputs.x, args.sigma, args.alpha, args.n0, args.n_samples, args.seed, seeds,
                                      serialized)
    if args.fallback == "none":
        return pipeline.certify(inputs.x, method=args.method, lipschitz=args.lipschitz,
                                dataset_identity=inputs.identity)
    from gmcert.hybrid import iter_certify_hybrid

    return iter_certify_hybrid(pipeline, inputs.x, args.policy, method=args.method, lipschitz=args.lipschitz,
                               dataset_identity=inputs.identity, seeds=seeds)


def _fallback_policy(args):
    from gmcert.compare import N_PILOT
    from gmcert.hybrid import FallbackPolicy, load_kl_per_class

    if not args.max_samples > N_PILOT:  # the smoother's pilot draws come out of the budget
        raise DataError(f"--max-samples must exceed the smoother's {N_PILOT} pilot draws, got {args.max_samples}")
    try:
        kl = load_kl_per_class(args.model)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DataError(f"{Path(args.model) / 'mismatch.json'} is unreadable ({type(err).__name__}: {err}); "
                        f"rerun `gmcert diagnose --model {args.model}`") from None
    if args.mismatch_threshold is not None and kl is None:
        raise DataError(f"--mismatch-threshold needs {args.model}/mismatch.json: run `gmcert diagnose --model "
                        f"{args.model}` first")
    target = args.target_radius if args.target_radius is not None else args.sigma
    return FallbackPolicy(target_radius=target, mismatch_threshold=args.mismatch_threshold, kl_per_class=kl,
                          sigma=args.sigma, alpha=args.alpha, max_samples=args.max_samples, seed=args.seed,
                          route_threshold=args.route_threshold)


def _calibrate_route_threshold(args, pipeline) -> None:
    """``--calibrate N``: tau from N training-split inputs, never from the inputs being certified."""
    from gmcert.hybrid import choose_route_threshold

    if args.latents or args.data:
        raise DataError("--calibrate uses the model's training split; it cannot be combined with --latents/--data")
    limit, args.limit = args.limit, args.calibrate
    try:
        train, _ = model_inputs(args, pipeline, "train")
    finally:
        args.limit = limit
    args.policy.route_threshold = choose_route_threshold(pipeline, train.x, train.labels, args.policy)
    print(f"route threshold tau = {args.policy.route_threshold:.4g} (best certified accuracy of h at "
          f"{args.policy.target_radius:.4g} on {len(train.labels)} training inputs)", file=sys.stderr)


def cmd_diagnose(args) -> int:
    from gmcert.mismatch.divergence import mismatch_report
    from gmcert.report import write_json_atomic

    pipeline = load_model(args.model, device=args.device, cache_dir=args.cache_dir or None)
    inputs, _ = model_inputs(args, pipeline, "train")
    out = Path(args.out) if args.out else Path(args.model)
    check_folder_target(out, "--out")
    for name in ("mismatch.json", "mismatch.png"):
        check_file_target(out / name, "--out")
    Z = pipeline.latents(inputs.x, dataset_identity=inputs.identity)
    report = mismatch_report(pipeline.head, Z, inputs.labels, k=args.k, n_bootstrap=args.bootstrap,
                             n_q_samples=args.q_samples, random_state=args.seed)
    print(report.table())
    if np.min(report.kl_per_class_interval) < 0:
        print("note: KL is never negative; negative estimates are the k-NN estimator's bias at this dimension and\n"
              "sample size, so eps and the plotted bound are indicative only (fit with a smaller --dim to tighten)")
    record = report.to_dict()
    record["classes"] = [int(c) for c in pipeline.head.classes_]
    record["config"] = {k: v for k, v in vars(args).items()}
    write_json_atomic(out / "mismatch.json", record)
    report.plot(out / "mismatch.png")
    print(f"wrote {out / 'mismatch.json'} and {out / 'mismatch.png'}")
    return 0


def cmd_compare(args) -> int:
    from gmcert.compare import CompareConfig, check_run_dir, run_compare

    cohen_n = _integers(args.cohen_n, "--cohen-n")
    radii = args.radii if args.radii is not None else list(np.linspace(0, 2 * args.sigma, 9))
    config = CompareConfig(methods=[m.strip() for m in args.methods.split(",") if m.strip()], sigma=args.sigma,
                           alpha=args.alpha, radii=[float(r) for r in radii], cohen_n=cohen_n, n0=args.n0,
                           max_samples=args.max_samples, radius_tol=args.radius_tol,
                           estimate=args.estimate, seed=args.seed, srs_steps=_integers(args.srs, "--srs"),
                           warmup_interval=args.warmup_interval, audit_size=args.audit_size,
                           smoothing_model=str(Path(args.smoothing_model).resolve()) if args.smoothing_model else None)
    pipeline = load_model(args.model, device=args.device, cache_dir=args.cache_dir or None)
    smoothed = None
    if args.smoothing_model:
        smoothed = load_model(args.smoothing_model, device=args.device, cache_dir=args.cache_dir or None)
        if not np.array_equal(smoothed.head.classes_, pipeline.head.classes_) or \
                tuple(smoothed.input_shape_) != tuple(pipeline.input_shape_):
            raise DataError(f"--smoothing-model {args.smoothing_model} must take the inputs --model takes (classes "
                            f"{smoothed.head.classes_.tolist()} vs {pipeline.head.classes_.tolist()}, input shape "
                            f"{tuple(smoothed.input_shape_)} vs {tuple(pipeline.input_shape_)})")
    inputs, index = model_inputs(args, pipeline, "test")
    keep = np.arange(min(args.n_inputs, len(index)))
    inputs, index = inputs.subset(keep), index[keep]
    if smoothed is not None and not (args.latents or args.data):
        held = set(smoothed.metadata.get("test_index", []))
        if smoothed.metadata.get("data") != pipeline.metadata.get("data") or not set(index.tolist()) <= held:
            raise DataError(f"--smoothing-model {args.smoothing_model} was trained on some of the inputs being "
                            "compared (its held-out split differs): train both with the same --data and --seed")
    out = Path(args.out) if args.out else Path(args.model) / "compare"
    check_folder_target(out, "--out")
    check_run_dir(out, config)
    from dataclasses import asdict

    from gmcert.distributed import agree, current
    from gmcert.distributed.rows import model_digest

    agree({**asdict(config), "model": model_digest(args.model),
           "smoothing_digest": model_digest(args.smoothing_model) if args.smoothing_model else None},
          "the compare settings and models")
    if not current().main:
        run_compare(pipeline, inputs.x, inputs.labels, index, out, config, smoothed=smoothed)
        return 0
    print(f"comparing {', '.join(config.method_names())} on {len(index)} inputs (sigma={config.sigma}, "
          f"alpha={config.alpha}, n0={config.n0}, sequential budget {config.max_samples}); "
          f"raise --n-inputs / --cohen-n for tighter figures", file=sys.stderr)
    record = run_compare(pipeline, inputs.x, inputs.labels, index, out, config, smoothed=smoothed)
    print((out / "summary.md").read_text())
    print(f"wrote {out}/<method>.tsv, summary.json, summary.md, certified_accuracy.png, samples.png")
    return 0 if record else 1


def _integers(text: str, option: str) -> list[int]:
    try:
        return [int(float(n)) for n in text.split(",") if n.strip()]
    except (ValueError, OverflowError):
        raise DataError(f"{option} must be comma-separated integers like 1e3,1e4, got {text!r}") from None


def _accuracy_table(radii, latent_acc, input_acc, kind) -> str:
    """Certified accuracy per radius; ``latent_acc`` None: smoothing only, no latent column."""
    latent = f"  {'certified acc (latent)':>22}" if latent_acc is not None else ""
    lines = [f"{'radius':>8}{latent}  {'certified acc (input, ' + kind + ')':>30}"]
    lines += [f"{r:>8.3g}" + (f"  {a:>22.4f}" if latent else "") + f"  {b:>30.4f}"
              for r, a, b in zip(radii, latent_acc if latent else input_acc, input_acc)]
    return "\n".join(lines)


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
