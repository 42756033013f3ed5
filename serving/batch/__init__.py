"""Batch scoring (``imgclf score``): inputs, the engine contract with the local and Ray
engines side by side, output writers, and the job."""
