"""torchmetrics Metrics and metric functions of the suite."""
