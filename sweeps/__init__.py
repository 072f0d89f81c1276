"""The sweep platform: search space -> trial driver -> Ray Train worker loop -> MLflow tracking and registry."""

import os

# MLflow's usage telemetry clears an environment variable from a background thread, which races
# with concurrent client calls in trial actors (KeyError '_MLFLOW_TELEMETRY_SESSION_ID'); these
# machines have no route to it anyway.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
