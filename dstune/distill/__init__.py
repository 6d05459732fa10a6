"""Knowledge distillation: a frozen teacher beside the student, and the divergence mixed into the loss."""
