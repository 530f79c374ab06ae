"""Data in: the manifest, decoding and resizing images, the HC18 import, and training-time augmentation."""
