# A package, so that its conftest.py is imported as gpu.conftest and never takes the place of tests/conftest.py
# (a second top-level "conftest" module would shadow `from conftest import ...` in the other test files).
