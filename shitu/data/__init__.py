"""Datasets: the ShiTuRecDataset format, checking, conversion and splitting."""
