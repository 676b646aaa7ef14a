"""Weight interop: official Sparse R-CNN checkpoints and torchvision ImageNet ResNets."""
