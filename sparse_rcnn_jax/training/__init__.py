"""Training: the set-prediction loss and matching, the optimizer, the train state, the loop."""
