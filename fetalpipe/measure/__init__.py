"""Geometry and measurements: BPD, OFD and HC from four points, ellipses, clinical context, the size correction and the review rule."""
