"""fetalpipe: fetal head biometry (BPD, OFD, HC) from 2D ultrasound, batch-distributed with Ray."""

__version__ = "0.1.0"

LANDMARK_NAMES = ("ofd1", "ofd2", "bpd1", "bpd2")
LANDMARK_COLUMNS = tuple(f"{name}_{axis}" for name in LANDMARK_NAMES for axis in ("x", "y"))
