"""Linewatch training: datasets, synthetic data, CNN, int8 export, evaluation, bundles.

Needs the ``training`` extra (TensorFlow). Must not import ``cloud``.
"""
