"""vgen.samplers"""
