"""Ray job entry point for calibration (int8 parameters and the size line): `ray job submit --working-dir . -- python jobs/calibrate.py --model … --manifest … --output …`.

Same arguments as `fetalpipe calibrate`. Inside a submitted job RAY_ADDRESS is set, so it joins the cluster."""

import sys

from fetalpipe.cli import main

if __name__ == "__main__":
    sys.exit(main(["calibrate", *sys.argv[1:]]))
