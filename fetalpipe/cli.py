"""The `fetalpipe` command: import-hc18, train, infer, calibrate, evaluate, study, report, demo."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time

ADDRESS_HELP = "a running Ray cluster, e.g. head-node:6379 (default: $RAY_ADDRESS, set by `ray job submit`; else a new local Ray)"


def _cmd_import_hc18(args) -> int:
    from fetalpipe.data.hc18 import hc_reproduction_error_mm, import_hc18

    manifest = import_hc18(args.hc18_dir)
    output_dir = os.path.dirname(os.path.abspath(args.output))
    os.makedirs(output_dir, exist_ok=True)
    manifest["image_path"] = [os.path.relpath(os.path.join(os.path.abspath(args.hc18_dir), p), output_dir) for p in manifest["image_path"]]
    if args.output.endswith(".parquet"):
        manifest.to_parquet(args.output, index=False)
    else:
        manifest.to_csv(args.output, index=False)
    error_mm = hc_reproduction_error_mm(manifest)
    print(f"wrote {len(manifest)} rows to {args.output}")
    print(f"HC from written endpoints (Ramanujan) vs published HC: mean |diff| {error_mm.mean():.4f} mm, max {error_mm.max():.4f} mm")
    return 0


def _cmd_train(args) -> int:
    from fetalpipe.model.config import resolve_config
    from fetalpipe.pipeline.train import run_training
    from fetalpipe.runtime import console, storage

    config = resolve_config(args.config, {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "bf16": args.bf16 or None})
    result = run_training(
        args.manifest, args.output, config, workers=args.workers, threads_per_worker=args.threads_per_worker,
        max_failures=args.max_failures, ray_address=args.address, stage1_model=args.stage1_model, verbose=args.verbose,
    )
    run_dir = storage.absolute(args.output)
    trained = storage.join(run_dir, "model.pt")
    outputs = {"model.pt": trained}
    if args.calibrate:
        calibrated = _calibrate_after_training(trained, args)
        if calibrated:
            outputs["model_calibrated.pt"] = calibrated + "  (the file to run `fetalpipe infer --model` with)"
    outputs.update({"metrics.csv": storage.join(run_dir, "metrics.csv"), "loss curves": storage.join(run_dir, "loss_curves.png"),
                    "Ray log": result.get("ray_log", "")})
    best = result.get("refinement", result)
    best_text = f"best epoch {best.get('best_epoch', '?')}, val HC MAE {best.get('val_hc_mae_mm', float('nan')):.2f} mm" if isinstance(best, dict) else ""
    wall_text = f"finished in {result['wall_seconds'] / 60:.1f} min" if "wall_seconds" in result else "finished"
    console.summary(f"fetalpipe train: {wall_text}; {best_text}", outputs)
    return 0


def _calibrate_after_training(trained: str, args) -> str | None:
    """`calibrate` on the new model (int8 parameters and the size line), into RUN_DIR/model_calibrated.pt: the file to
    run `infer` with. A manifest it cannot calibrate on (no training-split image, no pixel spacing, too few heads found)
    leaves the trained model as it is, and says why."""
    from fetalpipe.pipeline.calibrate import calibrate_model
    from fetalpipe.runtime import storage

    calibrated = storage.join(storage.absolute(args.output), "model_calibrated.pt")
    try:
        summary = calibrate_model(trained, args.manifest, calibrated, ray_address=args.address)
    except ValueError as error:
        print(f"fetalpipe train: not calibrated ({error}); `infer` runs {trained} in fp32 without a size correction", flush=True)
        return None
    print(f"calibrated: int8, size line {summary['intercept_mm']:+.3f} mm {summary['slope']:+.5f} × HC, review rule", flush=True)
    return calibrated


def _cmd_infer(args) -> int:
    from fetalpipe.pipeline.infer import InferOptions, run_inference

    options = InferOptions(
        output_dir=args.output, manifest=args.manifest, input_glob=args.input, model_path=args.model,
        batch_size=args.batch_size, actors=args.actors, threads_per_actor=args.threads_per_actor,
        overlays=args.overlays, overwrite=args.overwrite, ray_address=args.address, flip_average=args.flip_average,
        decode_in=args.decode_in, precision=args.precision, verbose=args.verbose, dry_run=args.dry_run,
    )
    run_inference(options)
    return 0


def _cmd_evaluate(args) -> int:
    from fetalpipe.measure.review import LARGE_ERROR_MM
    from fetalpipe.pipeline.evaluate import evaluate_predictions

    summary = evaluate_predictions(args.predictions, args.manifest, args.output)
    print(json.dumps(summary, indent=2))
    if summary["images_missing_prediction"]:
        print(f"fetalpipe evaluate: {summary['images_missing_prediction']} of the manifest's {summary['images_in_manifest']} images have no "
              f"measurement ({args.output}/unmeasured_images.csv says why); they count as failures in the SDR and the images over "
              f"{LARGE_ERROR_MM:g} mm, and the MAEs are over the {summary['images']} measured", file=sys.stderr)
    return 0


def _cmd_calibrate(args) -> int:
    from fetalpipe.pipeline.calibrate import add_rule_without_spacing, calibrate_model
    from fetalpipe.runtime import console

    output_folder = args.output.rsplit("/", 1)[0] if "://" in args.output else os.path.dirname(os.path.abspath(args.output))
    with console.ray_logs_to_file(console.ray_log_location(output_folder, f"calibrate-{time.strftime('%Y%m%dT%H%M%S')}.log"), args.verbose):
        if args.add_rule_without_spacing:
            report = add_rule_without_spacing(args.model, args.manifest, args.output, ray_address=args.address)
        else:
            summary = calibrate_model(args.model, args.manifest, args.output, ray_address=args.address)
            report = summary["review_without_spacing"]
    if not args.add_rule_without_spacing:
        print(f"HC error on the training split = {summary['intercept_mm']:+.3f} mm {summary['slope']:+.5f} × HC; "
              f"HC MAE {summary['train_hc_mae_mm_before']:.3f} -> {summary['train_hc_mae_mm_after']:.3f} mm over {summary['images']} images")
        print(f"review flag: flags {summary['review']['flagged_fraction']:.1%} of the split, {summary['review']['caught_fraction']:.0%} of its images above "
              f"{summary['review']['large_error_mm']:g} mm")
    print(f"review flag without a pixel spacing: flags {report['flagged_fraction']:.1%} of the split, {report['caught_fraction']:.0%} of its images "
          f"off by more than {report['large_error_fraction']:.0%} of HC")
    print(f"model: {args.output}")
    return 0


def _cmd_study(args) -> int:
    from fetalpipe.pipeline.study import run_study

    run_study(args.spec, run_date=args.run_date, ray_address=args.address, verbose=args.verbose)
    return 0


def _cmd_report(args) -> int:
    from fetalpipe.pipeline.report import write_report

    print(f"report: {write_report(args.output_dir)}")
    return 0


def _cmd_demo(args) -> int:
    from fetalpipe.pipeline.infer import run_demo

    run_demo(args.output, ray_address=args.address, verbose=args.verbose)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fetalpipe", description="Fetal head biometry (BPD, OFD, HC) from 2D ultrasound, on Ray.")
    commands = parser.add_subparsers(dest="command", required=True)

    command = commands.add_parser("import-hc18", help="turn the HC18 challenge layout into a training manifest")
    command.add_argument("hc18_dir", help="the HC18 folder: training_set/ and its pixel-size and HC CSVs")
    command.add_argument("--output", required=True, help="manifest path (.csv or .parquet)")
    command.set_defaults(handler=_cmd_import_hc18)

    command = commands.add_parser("train", help="train the U-Net data-parallel with Ray Train (resumes in RUN_DIR)")
    command.add_argument("--manifest", required=True, help="labelled manifest (image_path, subject_id, pixel_spacing_mm, the 8 landmark "
                         "coordinates): `import-hc18` writes one; split by subject_id for validation")
    command.add_argument("--output", required=True, help="RUN_DIR: checkpoints, metrics.csv, model.pt, model_calibrated.pt")
    command.add_argument("--workers", type=int, default=2, help="Ray Train worker processes, data-parallel (default 2)")
    command.add_argument("--threads-per-worker", type=int, default=1, help="torch threads in each worker (default 1: 2 x 1 is fastest on 2 cores)")
    command.add_argument("--epochs", type=int, help="override the config's epochs")
    command.add_argument("--batch-size", type=int, help="override the config's batch size (images per worker and step)")
    command.add_argument("--lr", type=float, help="override the config's learning rate")
    command.add_argument("--config", default="ellipse_refine",
                         help="ellipse_refine (default: the shipped two-stage recipe) | ellipse_deep (stage 1 alone) | ellipse | fast | "
                              "seed (the seed report's baseline) | a YAML/JSON file (docs/experiments.md says what each measures)")
    command.add_argument("--stage1-model", help="with a refinement config: take stage 1 from this model file instead of training it")
    command.add_argument("--bf16", action="store_true",
                         help="train stage 1 under bf16 autocast: a run 1.6-1.7x faster on CPUs with native bf16 (AVX512_BF16, AMX), at the "
                              "same accuracy in the runs measured (docs/experiments.md note 20); refused on a CPU without it, where it is about 25x slower")
    command.add_argument("--max-failures", type=int, default=2, help="times Ray Train restarts from the last checkpoint after a worker dies (default 2)")
    command.add_argument("--no-calibrate", dest="calibrate", action="store_false",
                         help="skip the calibration that follows training (int8 parameters and size line into RUN_DIR/model_calibrated.pt)")
    command.add_argument("--address", help=ADDRESS_HELP)
    command.add_argument("--verbose", action="store_true", help="show Ray's own logs on the console (default: RUN_DIR/logs/ray.log)")
    command.set_defaults(handler=_cmd_train)

    command = commands.add_parser("infer", help="batch inference with a Ray Data actor pool -> Parquet + CSV")
    source = command.add_mutually_exclusive_group(required=True)
    source.add_argument("--manifest", help="CSV or Parquet with image_path (pixel_spacing_mm for mm; other columns are carried to the outputs)")
    source.add_argument("--input", help="a folder or a glob of image files")
    command.add_argument("--output", required=True, help="OUT folder; a rerun into it measures only the images not done yet")
    command.add_argument("--model", help="model.pt (default: the model shipped in the package)")
    command.add_argument("--batch-size", type=int, default=64, help="images per model call and rows per Parquet file")
    command.add_argument("--actors", type=int, default=2, help="model actors, each with its own copy of the model (default 2)")
    command.add_argument("--threads-per-actor", type=int, default=1, help="torch threads in each actor (default 1)")
    command.add_argument("--overlays", action="store_true", help="also draw each image's landmarks, ellipse and review flag into OUT/overlays/")
    command.add_argument("--overwrite", action="store_true", help="measure every image again, replacing what OUT holds")
    command.add_argument("--flip-average", action="store_true", help="test-time augmentation: average with the mirrored image (2x cost)")
    command.add_argument("--decode-in", choices=("actors", "tasks"), default="actors",
                         help="decode images inside the model actors (default; no hand-off) or in separate Ray tasks (heavy decoding; "
                              "every decoded frame is handed to the actors whole: about twice the memory with large frames)")
    command.add_argument("--precision", choices=("auto", "int8", "fp32"), default="auto",
                         help="auto (default): int8 when the model file has int8 parameters (written by `calibrate`; about 2x faster forward), else fp32")
    command.add_argument("--address", help=ADDRESS_HELP)
    command.add_argument("--verbose", action="store_true", help="show Ray's own logs on the console (default: OUT/logs/ray.log)")
    command.add_argument("--dry-run", action="store_true",
                         help="only plan: validate the manifest, check what OUT already holds, list the missing or unreadable files; start and write nothing")
    command.set_defaults(handler=_cmd_infer)

    command = commands.add_parser("calibrate", help="choose int8 parameters and fit the size calibration and the review rules on the model's training split; write the calibrated model")
    command.add_argument("--model", required=True, help="a trained model.pt")
    command.add_argument("--manifest", required=True, help="the manifest it was trained on (split by subject_id as in training)")
    command.add_argument("--output", required=True, help="where the calibrated model goes (the training split's measurement stays in OUTPUT.calibration/)")
    command.add_argument("--add-rule-without-spacing", action="store_true",
                         help="for a model calibrated before the review flag had a rule for rows without a pixel spacing: add that rule, "
                              "measured with the file's own int8 parameters, and change nothing else")
    command.add_argument("--address", help=ADDRESS_HELP)
    command.add_argument("--verbose", action="store_true", help="show Ray's own logs on the console (default: logs/ray.log beside OUTPUT)")
    command.set_defaults(handler=_cmd_calibrate)

    command = commands.add_parser("evaluate", help="compare predictions with reference landmarks/HC")
    command.add_argument("--predictions", required=True, help="OUT folder of `fetalpipe infer`")
    command.add_argument("--manifest", required=True, help="the labelled manifest of the images measured (reference landmarks and HC)")
    command.add_argument("--output", required=True, help="REPORT folder: metrics.json, per_image_errors.csv, bland_altman_hc.png")
    command.set_defaults(handler=_cmd_evaluate)

    command = commands.add_parser("study", help="scheduled retrospective studies")
    study_commands = command.add_subparsers(dest="study_command", required=True)
    run = study_commands.add_parser("run", help="run STUDY.yaml into ROOT/<name>/<run-date>/")
    run.add_argument("spec", help="STUDY.yaml: name, input (manifest, folder or glob), model, output_root, overlays (README: Scheduled studies)")
    run.add_argument("--run-date", help="YYYY-MM-DD (default: today)")
    run.add_argument("--address", help=ADDRESS_HELP)
    run.add_argument("--verbose", action="store_true", help="show Ray's own logs on the console (default: OUT/logs/ray.log)")
    run.set_defaults(handler=_cmd_study)

    command = commands.add_parser("report", help="write OUT/report.html again from an inference output folder")
    command.add_argument("output_dir", help="OUT folder of `fetalpipe infer` or a study run")
    command.set_defaults(handler=_cmd_report)

    command = commands.add_parser("demo", help="run inference on the embedded sample with the shipped model")
    command.add_argument("--output", default="fetalpipe-demo", help="OUT folder (default: ./fetalpipe-demo)")
    command.add_argument("--address", help=ADDRESS_HELP)
    command.add_argument("--verbose", action="store_true", help="show Ray's own logs on the console (default: OUTPUT/logs/ray.log)")
    command.set_defaults(handler=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    args = build_parser().parse_args(argv)
    from fetalpipe.data.imaging import ImageDecodeError
    from fetalpipe.data.manifest import ManifestError
    from fetalpipe.model.model_file import ModelFileError
    from fetalpipe.pipeline.infer import ActorStartError
    from fetalpipe.runtime import console

    received = []

    def interrupt(signum, frame):
        received.append(signum)
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, interrupt)  # schedulers stop jobs with SIGTERM: leave as cleanly as Ctrl-C
    try:
        return args.handler(args)
    except (ManifestError, ModelFileError, ImageDecodeError, ActorStartError, FileNotFoundError, ValueError) as error:
        log_path = console.ray_log_path()
        print(f"fetalpipe {args.command}: error: {error}" + (f" (Ray's log: {log_path})" if log_path else ""), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        signum = received[-1] if received else signal.SIGINT
        print(f"fetalpipe {args.command}: interrupted by {signal.Signals(signum).name}; what was written is kept, "
              "rerun the same command to finish", file=sys.stderr, flush=True)
        _stop_local_ray()
        return 128 + signum


def _stop_local_ray() -> None:
    """Shut down Ray if this process started or joined it (a local instance then stops with it)."""
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()


def run() -> None:
    """The `fetalpipe` console script: `main`, then stop the local Ray and exit without the interpreter's teardown.
    Every output has been written and closed by then; the teardown (Ray's exit hook sleeps 0.5 s, then unloading
    torch and Ray) only costs time, 1.2 s a command on 2 cores (`bench/cli_exit_bench.py`)."""
    code = main()
    _stop_local_ray()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    run()
