"""``gmcert fit``, ``diagnose`` and ``compare``."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from gmcert.atomic import check_file_target, check_folder_target
from gmcert.cli.common import _accuracy_table, _encoder_channels, _integers
from gmcert.errors import DataError
from gmcert.inputs import fit_split, load_inputs, load_model, model_inputs


def cmd_fit(args) -> int:
    from gmcert.latent.mixture import GaussianMixtureClassifier
    from gmcert.pipeline import LINEAR_ENCODERS, Pipeline

    if args.latents:
        encoder, projection, data = "none", args.projection or "none", {"latents": str(Path(args.latents).resolve())}
    else:
        encoder, projection = args.encoder or "efficientnet_lite0", args.projection or "pca"
        from gmcert.data import resolve_split

        data = {"data": resolve_split(args.data or "digits", "train")}  # recorded with its split, for certify
    # Everything is checked, fitted and evaluated before the model directory is written.
    check_folder_target(args.out, "--out", owner_file="pipeline.json")
    inputs = load_inputs(data, channels=_encoder_channels(encoder), download=args.download, limit=args.limit,
                         root=args.data_root)
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
    resize = None
    if encoder not in LINEAR_ENCODERS:
        _ = pipeline.encoder  # an unknown card or missing weights fail here, before any work
        from gmcert.encoders.resizing import describe_resize

        resize = pipeline.input_resize(inputs.x.shape[2:])
        print(describe_resize(resize, inputs.x.shape[2:]), file=sys.stderr)
    dim = f"({args.dim})" if projection == "pca" else ""
    structure = "selected" if args.select else args.covariance_type  # --select chooses it on the training split
    print(f"fitting {encoder} -> {projection}{dim} -> {structure} Gaussian mixture on {len(train)} inputs",
          file=sys.stderr)
    fit_inputs = inputs.subset(train)
    from gmcert.distributed import agree, current

    agree({k: v for k, v in vars(args).items() if k not in ("device", "cache_dir")}, "the fit settings")
    pipeline.fit(fit_inputs.x, fit_inputs.labels, dataset_identity=fit_inputs.identity,
                 noise_sigma=args.noise_sigma, noise_copies=args.noise_copies, random_state=args.seed, distributed=True,
                 select=args.select)
    if not current().main:  # under torchrun the ranks encoded their shares; rank 0 evaluates and saves
        return 0
    pipeline.metadata = {**data, "channels": inputs.channels, "test_index": test.tolist(), "seed": args.seed,
                         "noise_sigma": args.noise_sigma, "noise_copies": args.noise_copies, "resize": resize}
    if args.select:  # chosen on the training split's latents only; the held-out split stays unseen
        pipeline.metadata["head_selection"] = pipeline.selection_.to_dict()
        print(pipeline.selection_.table())
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
    # the sound statements come from the held-out split, which the head was not fitted on
    held, _ = model_inputs(args, pipeline, "test")
    evidence = None
    if len(held.labels):
        from gmcert.mismatch.bounds import heldout_evidence

        certs = pipeline.certify(held.x, dataset_identity=held.identity)
        kinds = sorted({c.radius_kind for c in certs})
        deployed = {"correct": np.array([c.prediction == label for c, label in zip(certs, held.labels)]),
                    "radius": np.array([c.radius for c in certs]), "kind": "/".join(kinds)}
        evidence = heldout_evidence(pipeline.head, pipeline.latents(held.x, dataset_identity=held.identity),
                                    held.labels, random_state=args.seed, inputs=deployed)
    else:
        print("note: the model has no held-out split (fitted with --test-size 0): no sound statements, only "
              "the k-NN estimates below", file=sys.stderr)
    report = mismatch_report(pipeline.head, Z, inputs.labels, k=args.k, n_bootstrap=args.bootstrap,
                             n_q_samples=args.q_samples, random_state=args.seed, heldout=evidence)
    print(report.table())
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
    from dataclasses import asdict

    from gmcert.distributed import agree, current
    from gmcert.distributed.rows import model_digest

    config.radius_scale = inputs.radius_scale  # radii on the images given (grey repeated to RGB: / sqrt(3))
    config.identity = {"model": model_digest(args.model), "inputs": inputs.content_identity(),
                       "smoothing_model": model_digest(args.smoothing_model) if args.smoothing_model else None}
    check_run_dir(out, config)
    agree(asdict(config), "the compare settings and models")
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
