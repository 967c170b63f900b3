"""Knowledge distillation and teacher correction: losses, the co-located teacher/student pair, the training loop."""
