"""vgen.kernels"""
