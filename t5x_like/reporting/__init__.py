"""Reporting: TensorBoard and the progress line, the parameter table, device peaks."""
