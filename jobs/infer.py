"""Ray job entry point for batch inference: `ray job submit --working-dir . -- python jobs/infer.py --manifest … --output …`.

Same arguments as `fetalpipe infer`. Inside a submitted job RAY_ADDRESS is set, so it joins the cluster."""

import sys

from fetalpipe.cli import main

if __name__ == "__main__":
    sys.exit(main(["infer", *sys.argv[1:]]))
