"""The report writers behind benches/report.py, one module per benchmark script."""
