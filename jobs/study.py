"""Ray job entry point for a scheduled study: `ray job submit --working-dir . -- python jobs/study.py STUDY.yaml`."""

import sys

from fetalpipe.cli import main

if __name__ == "__main__":
    sys.exit(main(["study", "run", *sys.argv[1:]]))
