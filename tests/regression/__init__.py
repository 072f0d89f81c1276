"""Output regression suite: cases.py (the cases, how to add yours), create.py (writing references, dirty-tree policy),
test_regression.py (the comparison), references/ (one safetensors file per case)."""
