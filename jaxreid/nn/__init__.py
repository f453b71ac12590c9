"""Layers shared by every method: normalisations, Transformer layers and their initialisers.

A fix here changes every method that uses the layer, which is the point: methods import these and
never each other.
"""
