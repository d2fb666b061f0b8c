"""Trust in suggestions: calibrated probabilities, verified regions at a target precision, and the task score."""
