"""Ray Tune x Ray Train sweeps over PEFT methods, tracked in MLflow."""
