"""Models-from-code entry point of a registered adapter (MLflow stores this file, not a pickle)."""

import mlflow

from sweeps.serving import PeftAdapterModel

mlflow.models.set_model(PeftAdapterModel())
