"""``gmcert certify``: closed form, hybrid routing, or smoothing only (Cohen or serialized), in
Cohen's TSV, resumable, sharded under torchrun."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from gmcert.atomic import check_file_target
from gmcert.cli.common import CERTIFY_SETTINGS, _accuracy_table
from gmcert.errors import DataError
from gmcert.inputs import file_digest, load_model, model_inputs


def cmd_certify(args) -> int:
    from tqdm import tqdm

    from gmcert.report import CertifyWriter, certificate_row, certified_accuracy, summarize, write_json_atomic

    pipeline = load_model(args.model, device=args.device, cache_dir=args.cache_dir or None)
    if args.fallback != "none":
        args.policy = _fallback_policy(args)
    inputs, index = model_inputs(args, pipeline, "test")
    if args.fallback != "none" and inputs.radius_scale != 1.0:  # the user's radii are on their images
        for name in ("target_radius", "route_threshold"):
            if getattr(args.policy, name) is not None:
                setattr(args.policy, name, getattr(args.policy, name) / inputs.radius_scale)
    if args.method == "smoothing" and args.fallback != "none":
        raise DataError("--method smoothing certifies every input by smoothing: it takes no --fallback")
    if args.serialized and args.method != "smoothing":
        raise DataError("--serialized draws smoothing samples: use it with --method smoothing")
    if args.verify and not args.serialized:
        raise DataError("--verify proves serialized smoothing's warm answers: use it with --serialized")
    if args.verify and args.audit_size is not None:
        raise DataError("--verify proves every warm answer: it takes no --audit-size")
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
    settings = {**{k: getattr(args, k) for k in CERTIFY_SETTINGS}, "model": model_digest(args.model),
                **resume_identity(args, inputs)}
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
        for i, label, cert in zip(index[todo], part.labels, certs):  # radii on the images given (grey or not)
            writer.write(certificate_row(i, label, cert.in_image_units(inputs.radius_scale)))
            bar.update(1)
    rows = writer.close()
    if not w.main:
        return 0
    summary = summarize(rows, args.radii)
    summary["latent_certified_accuracy"] = certified_accuracy(
        [{**r, "radius": r["latent_radius"] if r["path"] == "closed_form" else 0.0} for r in rows],
        args.radii).tolist()
    summary["config"] = {k: v for k, v in vars(args).items() if k != "policy"}
    summary["resize"] = pipeline.input_resize(inputs.x.shape[2:]) if inputs.x.ndim == 4 else None
    summary["radius_scale"] = inputs.radius_scale
    if args.fallback != "none":
        from dataclasses import asdict

        summary["fallback_policy"] = asdict(args.policy)
    write_json_atomic(out.with_suffix(".json"), summary)
    if inputs.radius_scale != 1.0:
        print("grey images repeated to the model's 3 channels: radii are on the grey images, the RGB input's "
              "divided by sqrt(3) (a grey change of norm d moves the RGB input by sqrt(3) d)")
    kinds = ", ".join(f"{n} {k}" for k, n in summary["rows_by_radius_kind"].items())
    print(f"wrote {out} and {out.with_suffix('.json')} ({len(rows)} inputs; radius kinds: {kinds})")
    print(f"clean accuracy: {summary['clean_accuracy']:.4f}   average certified radius: "
          f"{summary['average_certified_radius']:.4g}")
    print(_accuracy_table(args.radii, None if args.method == "smoothing" else summary["latent_certified_accuracy"],
                          summary["certified_accuracy"],
                          "/".join(summary["rows_by_radius_kind"])))
    return 0


def resume_identity(args, inputs) -> dict:
    """The content of everything besides the model that a certify run reads, for its resume
    settings: the inputs (``--data``/``--latents`` or the model's held-out rows) and, for the hybrid
    route, the ``mismatch.json`` whose thresholds route rows. Paths alone would let a resume merge
    rows computed on a file since overwritten."""
    mismatch = file_digest(Path(args.model) / "mismatch.json") if args.fallback != "none" else None
    return {"inputs": inputs.content_identity(), "mismatch": mismatch}


def _certify(args, pipeline, inputs, seeds):
    """Certificates in input order; smoothing ones arrive one by one, so rows are written as they come."""
    if args.method == "smoothing":
        from gmcert.hybrid import iter_certify_smoothing

        serialized = {"steps": args.steps, "warmup_interval": args.warmup_interval, "audit_size": args.audit_size,
                      "verify": args.verify} if args.serialized else None
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
