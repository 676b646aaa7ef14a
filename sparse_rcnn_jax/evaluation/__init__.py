"""Evaluation and export: inference over a dataset, COCO AP, test-time augmentation, pictures,
and the exported program."""
