"""omnilab: one PyTorch Lightning suite for ten recent methods in multimodal generation (see README.md)."""

import os

# MLflow must never unpickle what it reads back (docs/architecture.md).
os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] = "false"

__version__ = "0.1.0"
