"""Benchmarks: training-step speed of trainers (``speed``) and the few-label training protocol (``fewlabel``)."""
