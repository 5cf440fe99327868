"""Training: optimizer, loss, train state, the jitted step, checkpoints, metrics, the loop."""
