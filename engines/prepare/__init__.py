"""`lowbit prepare`: quantized artifacts for each engine from one source model, gated on accuracy.

Heavy conversion libraries (torch, transformers, optimum-intel, NNCF) are imported inside
functions: installing them is optional (`make install-prepare`), serving needs none of them.
"""
