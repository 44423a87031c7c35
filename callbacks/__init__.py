"""Training-time extras: what TensorBoard shows beyond the loss curves."""
