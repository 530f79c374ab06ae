"""Ray job entry point for training: `ray job submit --working-dir . -- python jobs/train.py --manifest … --output …`.

Same arguments as `fetalpipe train`. Inside a submitted job RAY_ADDRESS is set, so it joins the cluster."""

import sys

from fetalpipe.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
