"""Training: image folder -> best Keras checkpoint, evaluation report and plots."""
