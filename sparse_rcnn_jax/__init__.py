"""Sparse R-CNN (Sun et al., CVPR 2021) in JAX/Flax."""
