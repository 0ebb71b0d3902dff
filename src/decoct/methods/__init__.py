"""Distillation and selection methods."""
