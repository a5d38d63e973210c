"""What the stages compute from the artifacts: factors, priors, evaluation, the comparison,
report and aggregate, distribution shift, predictions for new inputs, the GPU check."""
