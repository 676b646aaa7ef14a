"""The detector: backbones, FPN, RoIAlign and the dynamic head, as linen modules."""
