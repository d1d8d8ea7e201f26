"""Measurement: timers and memory, multiply-add counting, profiling of model kinds."""
