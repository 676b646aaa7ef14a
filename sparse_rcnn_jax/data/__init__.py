"""Data: COCO-format folders, TFDS, the embedded synthetic set, transforms and batching."""
