"""One LightningModule per method (the paper's model, losses and steps); shared nn pieces in components/."""
