"""vgen.eval"""
