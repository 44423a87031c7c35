"""Training-time extras (what TensorBoard shows beyond the loss curves, fault tolerance) and the bits
``predict`` writes."""
