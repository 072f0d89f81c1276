"""Benchmarks (`make bench`): speed and memory of peft_engine and the sweep platform against
their peers (HF PEFT, the bare base model, transformers' Trainer + Ray Tune), measured side
by side in one process and written to ``benchmarks/results/<name>.json``.

Speed is only measured here, never asserted in tests: goals are printed with PASS/FAIL next
to each number, and ``python -m benchmarks.run_all`` exits 0 whether or not they are met.
"""
