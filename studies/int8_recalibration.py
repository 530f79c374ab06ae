"""Does `calibrate` give back a model file's stored stage-1 int8 parameters? And what do the ones it picks today change?

Why: the shipped file's int8 parameters were chosen once, by an earlier version of `calibrate`. This chooses them again on the
images `calibrate_model` chooses (`calibrate.int8_parameter_images`), lists each activation whose scale or zero point
differs from the stored one, and writes a copy of the file with today's parameters and nothing else changed, to be
measured beside the stored file:

    python studies/int8_recalibration.py --model fetalpipe/assets/model.pt --manifest runs/hc18.csv \
        --output runs/model_today_scales.pt --results studies/results/int8_recalibration.json
    fetalpipe infer --manifest runs/hc18_val.csv --output runs/val_today_scales --model runs/model_today_scales.pt
    fetalpipe evaluate --predictions runs/val_today_scales --manifest runs/hc18_val.csv --output runs/val_today_scales/report
    (and the same with the stored file into runs/val_now)"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fetalpipe.model.model_file import load_model  # noqa: E402
from fetalpipe.model.quantize import observe_quantization  # noqa: E402
from fetalpipe.pipeline.calibrate import int8_parameter_images, training_split  # noqa: E402

SCALE_TOLERANCE = 1e-6  # relative: below it, a scale differs only by float32 rounding of the stored value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a calibrated model file")
    parser.add_argument("--manifest", required=True, help="the labelled manifest the model was trained and calibrated on")
    parser.add_argument("--output", help="write the model file with today's stage-1 int8 parameters here")
    parser.add_argument("--results")
    args = parser.parse_args()

    model, config, payload = load_model(args.model)
    stored = payload["int8_quantization"]
    _, _, images = int8_parameter_images(training_split(args.manifest, config), config.input_size)  # as calibrate_model chooses them
    today = observe_quantization(model, images)
    differing = {name: {"stored": stored[name], "today": today[name], "scale_change": today[name][0] / stored[name][0] - 1}
                 for name in stored if abs(today[name][0] / stored[name][0] - 1) > SCALE_TOLERANCE or today[name][1] != stored[name][1]}
    results = {"model": args.model, "activations": len(stored), "differing": differing, "threads": torch.get_num_threads(),
               "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    largest = max((abs(entry["scale_change"]) for entry in differing.values()), default=0.0)
    print(f"{len(differing)} of {len(stored)} activations differ; largest scale change {largest:.2%}; "
          f"zero points differing: {sum(entry['stored'][1] != entry['today'][1] for entry in differing.values())}")
    if args.output:
        raw = torch.load(args.model, map_location="cpu", weights_only=False)
        raw["int8_quantization"] = today
        torch.save(raw, args.output)
        print(f"wrote {args.output}")
    if args.results:
        with open(args.results, "w") as handle:
            json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main()
