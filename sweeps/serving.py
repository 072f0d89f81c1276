"""A registered adapter as an ``mlflow.pyfunc`` model: base + adapter -> generated text.

    model = mlflow.pyfunc.load_model("models:/quickstart-adapter@champion")
    model.predict(["How are you?"], params={"max_new_tokens": 32})

The model's artifacts are the adapter folder (HF PEFT format, usable without MLflow too)
and ``trial.json`` naming the base model spec, task and quantization the adapter was
trained on; the base itself is loaded from the model cache, never stored in the registry.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import mlflow.pyfunc

TRIAL_META = "trial.json"
ADAPTER_ARTIFACT = "adapter"


def read_meta(adapter_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(adapter_dir, TRIAL_META)
    if not path.exists():
        raise FileNotFoundError(f"{adapter_dir} has no {TRIAL_META}: it is not an adapter written by a sweep")
    return json.loads(path.read_text())


def load_adapter(adapter_dir: str | os.PathLike, *, device: str | None = None, is_trainable: bool = False):
    """(peft model, tokenizer, meta) for an adapter folder written by a sweep."""
    from peft_engine import PeftModel
    from peft_engine.bases import load_base

    meta = read_meta(adapter_dir)
    base = meta["base"]
    model, tokenizer = load_base(base["model"], task=base["task"], dtype=base["dtype"], device=device,
                                 quantization=meta["quantization"], trust_remote_code=base.get("trust_remote_code", False),
                                 num_labels=base.get("num_labels"))
    return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=is_trainable), tokenizer, meta


class PeftAdapterModel(mlflow.pyfunc.PythonModel):
    """Generates a reply for each prompt with the base model plus the registered adapter."""

    def load_context(self, context: Any) -> None:
        self.model, self.tokenizer, self.meta = load_adapter(context.artifacts[ADAPTER_ARTIFACT])
        self.model.eval()

    # No type hints here: MLflow reads predict's hints as an input schema and would reject DataFrames.
    def predict(self, context, model_input, params=None):
        """One reply per prompt (a string, a list of strings, or a DataFrame with a ``prompt`` column)."""
        import torch

        prompts = _prompts(model_input)
        params = params or {}
        max_new = int(params.get("max_new_tokens", 64))
        replies = []
        for prompt in prompts:
            messages = [{"role": "user", "content": prompt}]
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                     return_dict=True)
            with torch.no_grad():
                out = self.model.generate(**ids, max_new_tokens=max_new, do_sample=False,
                                          pad_token_id=self.tokenizer.pad_token_id)
            replies.append(self.tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
        return replies


def _prompts(model_input: Any) -> list[str]:
    if isinstance(model_input, str):
        return [model_input]
    if hasattr(model_input, "columns"):  # a pandas DataFrame
        column = "prompt" if "prompt" in model_input.columns else model_input.columns[0]
        return [str(v) for v in model_input[column].tolist()]
    return [str(v) for v in model_input]


def log_adapter_model(run_id: str, adapter_dir: str, tracking_uri: str) -> str:
    """Log the adapter as a pyfunc model in ``run_id``; return its model URI."""
    import mlflow

    root = Path(__file__).resolve().parent.parent
    mlflow.set_tracking_uri(tracking_uri)
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name=ADAPTER_ARTIFACT,
            python_model=str(Path(__file__).with_name("pyfunc_entry.py")),
            artifacts={ADAPTER_ARTIFACT: adapter_dir},
            code_paths=[str(root / "peft_engine"), str(root / "sweeps")],
            pip_requirements=_requirements(),
        )
    return info.model_uri


def _requirements() -> list[str]:
    from importlib import metadata

    names = ("torch", "transformers", "safetensors", "bitsandbytes", "mlflow", "gguf", "datasets")
    out = []
    for name in names:
        try:
            out.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    return out
